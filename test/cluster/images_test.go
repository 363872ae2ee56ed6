package cluster

import (
	"archive/tar"
	"context"
	"errors"
	"io"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// TestBuildImages: the tarball holds each image under its name, runnable by
// containerd: the platform set, the entrypoint the binary, the binary
// executable in the single layer.
func TestBuildImages(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dst := filepath.Join(t.TempDir(), "images.tar")
	if _, err := BuildImages(ctx, dst, PauseImage, ZtunnelStandInImage); err != nil {
		t.Fatal(err)
	}
	for _, im := range []Image{PauseImage, ZtunnelStandInImage} {
		tag, err := name.NewTag(im.Ref)
		if err != nil {
			t.Fatal(err)
		}
		img, err := tarball.ImageFromPath(dst, &tag)
		if err != nil {
			t.Fatalf("%s: %v", im.Ref, err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		bin := "/" + filepath.Base(im.Package)
		if cf.OS != "linux" || cf.Architecture == "" || len(cf.Config.Entrypoint) != 1 || cf.Config.Entrypoint[0] != bin {
			t.Errorf("%s: os %q arch %q entrypoint %v, want linux, set, [%s]", im.Ref, cf.OS, cf.Architecture, cf.Config.Entrypoint, bin)
		}
		layers, err := img.Layers()
		if err != nil || len(layers) != 1 {
			t.Fatalf("%s: layers %d, %v", im.Ref, len(layers), err)
		}
		rc, err := layers[0].Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(rc)
		found := false
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if "/"+h.Name == bin && h.Mode&0o111 != 0 && h.Size > 100<<10 {
				found = true
			}
		}
		rc.Close()
		if !found {
			t.Errorf("%s: no executable %s in the layer", im.Ref, bin)
		}
	}
}
