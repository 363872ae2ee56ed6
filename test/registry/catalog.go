package registry

import (
	"fmt"
	"io/fs"
	"regexp"
	"strings"
	"testing/fstest"

	"github.com/meshkeeper/meshkeeper/bundles"
)

// CatalogTree is the embedded bundles tree (catalog/ and charts/) as a
// writable in-memory copy, for publishing catalogs that differ from it.
func CatalogTree() (fstest.MapFS, error) {
	out := fstest.MapFS{}
	err := fs.WalkDir(bundles.FS, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := fs.ReadFile(bundles.FS, p)
		if err != nil {
			return err
		}
		out[p] = &fstest.MapFile{Data: data, Mode: 0o444}
		return nil
	})
	return out, err
}

// AddRelease adds catalog/<to>.yaml to tree: a copy of release from's
// manifest with every occurrence of the version from replaced by to (its
// images too), like a new Istio release, and, when given, the minors it
// upgrades from.
func AddRelease(tree fstest.MapFS, from, to string, upgradeFrom ...string) error {
	f, ok := tree["catalog/"+from+".yaml"]
	if !ok {
		return fmt.Errorf("no catalog/%s.yaml to copy", from)
	}
	out := strings.ReplaceAll(string(f.Data), from, to)
	if len(upgradeFrom) > 0 {
		re := regexp.MustCompile(`(?m)^upgradeFrom:.*$`)
		out = re.ReplaceAllString(out, fmt.Sprintf("upgradeFrom: [\"%s\"]", strings.Join(upgradeFrom, `", "`)))
	}
	tree["catalog/"+to+".yaml"] = &fstest.MapFile{Data: []byte(out), Mode: 0o444}
	return nil
}
