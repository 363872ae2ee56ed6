package helm

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"slices"
	"strings"

	"helm.sh/helm/v4/pkg/chart/loader/archive"
	chartv2 "helm.sh/helm/v4/pkg/chart/v2"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/ignore"
)

// digestVersion is mixed into every digest: bump it when the way inputs are
// turned into objects changes (for example the post-renderer), so that
// deployed releases are upgraded once.
const digestVersion = "meshkeeper-helm/v1"

// Release labels (on the Helm release Secret) that record what a revision
// was made from.
const (
	labelChartDigest  = "meshkeeper.dev/chart-digest"
	labelValuesDigest = "meshkeeper.dev/values-digest"
)

var utf8BOM = []byte{0xEF, 0xBB, 0xBF}

// loadChart loads the chart whose Chart.yaml is at the root of fsys, honouring
// .helmignore like Helm's directory loader, and returns it with a digest of
// its files. The loader works on in-memory files, so no temporary directory
// is needed.
func loadChart(fsys fs.FS) (*chartv2.Chart, string, error) {
	if fsys == nil {
		return nil, "", errors.New("no chart")
	}
	if _, err := fs.Stat(fsys, "Chart.yaml"); err != nil {
		return nil, "", fmt.Errorf("chart has no Chart.yaml at its root: %w", err)
	}
	rules := ignore.Empty()
	if data, err := fs.ReadFile(fsys, ignore.HelmIgnore); err == nil {
		if rules, err = ignore.Parse(bytes.NewReader(data)); err != nil {
			return nil, "", fmt.Errorf("parse %s: %w", ignore.HelmIgnore, err)
		}
	}
	rules.AddDefaults()

	var files []*archive.BufferedFile
	var total int64
	err := fs.WalkDir(fsys, ".", func(name string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if name == "." {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			if rules.Ignore(name, fi) {
				return fs.SkipDir
			}
			return nil
		}
		if rules.Ignore(name, fi) {
			return nil
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("cannot load irregular file %s", name)
		}
		if total += fi.Size(); total > archive.MaxDecompressedChartSize {
			return fmt.Errorf("chart is larger than %d bytes", archive.MaxDecompressedChartSize)
		}
		data, err := fs.ReadFile(fsys, name)
		if err != nil {
			return err
		}
		files = append(files, &archive.BufferedFile{Name: name, ModTime: fi.ModTime(), Data: bytes.TrimPrefix(data, utf8BOM)})
		return nil
	})
	if err != nil {
		return nil, "", fmt.Errorf("read chart: %w", err)
	}
	ch, err := loader.LoadFiles(files)
	if err != nil {
		return nil, "", fmt.Errorf("load chart: %w", err)
	}
	if err := ch.Validate(); err != nil {
		return nil, "", fmt.Errorf("invalid chart: %w", err)
	}

	h := sha256.New()
	h.Write([]byte(digestVersion + "\x00"))
	slices.SortFunc(files, func(a, b *archive.BufferedFile) int { return strings.Compare(a.Name, b.Name) })
	for _, f := range files {
		fmt.Fprintf(h, "%s\x00%d\x00", f.Name, len(f.Data))
		h.Write(f.Data)
	}
	return ch, shortDigest(h.Sum(nil)), nil
}

// valuesDigest digests everything besides the chart that shapes the objects
// of a release: values, post-render labels and the target namespace.
// encoding/json sorts map keys, so equal inputs give equal digests.
func valuesDigest(values map[string]any, labels map[string]string, namespace string) (string, error) {
	doc := struct {
		Version   string            `json:"v"`
		Namespace string            `json:"ns"`
		Values    map[string]any    `json:"values"`
		Labels    map[string]string `json:"labels"`
	}{digestVersion, namespace, values, labels}
	data, err := json.Marshal(doc)
	if err != nil {
		return "", fmt.Errorf("values are not serialisable: %w", err)
	}
	sum := sha256.Sum256(data)
	return shortDigest(sum[:]), nil
}

// shortDigest fits a label value (at most 63 characters): 192 bits of hex.
func shortDigest(sum []byte) string { return hex.EncodeToString(sum[:24]) }

// copyValues deep-copies a values tree: Helm coalesces chart defaults into
// the map it is given.
func copyValues(v map[string]any) map[string]any {
	if v == nil {
		return map[string]any{}
	}
	out := make(map[string]any, len(v))
	for k, x := range v {
		out[k] = copyValue(x)
	}
	return out
}

func copyValue(v any) any {
	switch t := v.(type) {
	case map[string]any:
		return copyValues(t)
	case []any:
		out := make([]any, len(t))
		for i, x := range t {
			out[i] = copyValue(x)
		}
		return out
	case map[string]string:
		return maps.Clone(t)
	case []string:
		return slices.Clone(t)
	default:
		return v
	}
}
