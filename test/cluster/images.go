package cluster

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Image is a container image built from one Go main package of this
// repository: the binary alone, statically linked, in a single layer.
type Image struct {
	// Ref is the image's name, e.g. meshkeeper.test/workload:dev. Never an
	// upstream name: stand-ins are swapped in through bundle values.
	Ref string
	// Package is the main package, relative to the repository root
	// (./test/images/pause, ./cmd/agent).
	Package string
	// Binary is the path of the binary in the image; default /<base of Package>.
	Binary string
	// Entrypoint defaults to [Binary].
	Entrypoint []string
	// Extra are more main packages whose binaries the image carries, each
	// at /<base of its package> in a layer of its own.
	Extra []string
}

// The images of the real-node tests (see test/images).
var (
	PauseImage    = Image{Ref: "meshkeeper.test/pause:dev", Package: "./test/images/pause"}
	WorkloadImage = Image{Ref: "meshkeeper.test/workload:dev", Package: "./test/images/workload"}
	// ZtunnelStandInImage is a test double of upstream ztunnel: a ZDS client
	// of the node agent that proxies each handed-off pod's connections
	// (test/images/ztunnel-stand-in).
	ZtunnelStandInImage = Image{Ref: "meshkeeper.test/ztunnel-stand-in:dev", Package: "./test/images/ztunnel-stand-in"}
	// AgentImage is the shipped node agent, cmd/agent, with the CNI plugin
	// it installs on its node (cmd/meshkeeper-cni), as Dockerfile.agent.
	AgentImage = Image{Ref: "meshkeeper.test/agent:dev", Package: "./cmd/agent", Binary: "/agent", Extra: []string{"./cmd/meshkeeper-cni"}}
)

// BuildImages compiles each image's package (CGO off, linux/amd64 of this
// machine) and writes them all into one image tarball at dst, which
// `ctr images import` reads. It returns how long it took.
func BuildImages(ctx context.Context, dst string, imgs ...Image) (time.Duration, error) {
	began := time.Now()
	root, err := RepoRoot()
	if err != nil {
		return 0, err
	}
	work, err := os.MkdirTemp("", "meshkeeper-images-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(work)

	// One go build for every package: the build cache makes it cheap.
	var pkgs []string
	for _, im := range imgs {
		pkgs = append(pkgs, im.Package)
		for _, x := range im.Extra {
			if !slices.Contains(pkgs, x) {
				pkgs = append(pkgs, x)
			}
		}
	}
	cmd := exec.CommandContext(ctx, "go", append([]string{"build", "-trimpath", "-ldflags=-s -w", "-o", work + "/"}, pkgs...)...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if out, err := cmd.CombinedOutput(); err != nil {
		return 0, fmt.Errorf("images: go build %v: %w\n%s", pkgs, err, out)
	}

	refs := map[name.Reference]v1.Image{}
	for _, im := range imgs {
		bin := im.Binary
		if bin == "" {
			bin = "/" + filepath.Base(im.Package)
		}
		built := filepath.Join(work, filepath.Base(im.Package))
		img, err := binaryImage(built, bin, im.Entrypoint)
		if err != nil {
			return 0, fmt.Errorf("images: %s: %w", im.Ref, err)
		}
		for _, x := range im.Extra {
			data, err := os.ReadFile(filepath.Join(work, filepath.Base(x)))
			if err != nil {
				return 0, fmt.Errorf("images: %s: %w", im.Ref, err)
			}
			layer, err := fileLayer(filepath.Base(x), data)
			if err != nil {
				return 0, fmt.Errorf("images: %s: %w", im.Ref, err)
			}
			if img, err = mutate.AppendLayers(img, layer); err != nil {
				return 0, fmt.Errorf("images: %s: %w", im.Ref, err)
			}
		}
		ref, err := name.ParseReference(im.Ref, name.StrictValidation)
		if err != nil {
			return 0, fmt.Errorf("images: %s: %w", im.Ref, err)
		}
		refs[ref] = img
	}
	if err := tarball.MultiRefWriteToFile(dst, refs); err != nil {
		return 0, fmt.Errorf("images: write %s: %w", dst, err)
	}
	return time.Since(began), nil
}

func binaryImage(src, dst string, entrypoint []string) (v1.Image, error) {
	data, err := os.ReadFile(src)
	if err != nil {
		return nil, err
	}
	layer, err := fileLayer(strings.TrimPrefix(dst, "/"), data)
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	if len(entrypoint) == 0 {
		entrypoint = []string{dst}
	}
	cf.Config.Entrypoint = entrypoint
	cf.Config.Env = []string{"PATH=/"}
	return mutate.ConfigFile(img, cf)
}

// fileLayer is an uncompressed layer holding one executable file (and its
// parent directories).
func fileLayer(path string, data []byte) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dir := filepath.Dir(path)
	if dir != "." {
		var parts []string
		for d := dir; d != "."; d = filepath.Dir(d) {
			parts = append([]string{d}, parts...)
		}
		for _, d := range parts {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755}); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: path, Mode: 0o755, Size: int64(len(data))}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(data); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	raw := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(raw)), nil
	})
}
