// Package oci pulls meshkeeper bundle catalogs from an OCI registry, verifies
// them and publishes them, through oras-go (the generic OCI artifact library
// Helm's own registry client is built on; Helm's client only speaks chart
// artifacts). It is the only package that talks to a registry.
//
// A catalog artifact is an OCI image manifest (artifactType ArtifactType)
// with one layer: a gzipped tar of a tree laid out like bundles/ (catalog/
// and charts/). What is trusted:
//
//   - the registry's content addressing: every blob read is checked against
//     the digest the manifest names (oras-go's verifying reader);
//   - the publisher: the manifest carries an ed25519 signature, in the
//     annotation SignatureAnnotation, over the layer's digest; the operator
//     is configured with the publisher's public key. Without a key, the
//     source reference must pin the manifest by digest (ref@sha256:...), and
//     only that exact artifact is accepted (no updates until the flag
//     changes, for mirrors that re-sign nothing).
package oci

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing/fstest"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote"

	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

const (
	// ArtifactType is the artifactType of a catalog manifest.
	ArtifactType = "application/vnd.meshkeeper.catalog.v1"
	// LayerMediaType is the media type of its one layer.
	LayerMediaType = "application/vnd.meshkeeper.catalog.v1.tar+gzip"
	// SignatureAnnotation holds the base64 ed25519 signature of
	// SignedPayload(layer digest).
	SignatureAnnotation = "dev.meshkeeper.catalog.signature"

	// maxLayer and maxUnpacked bound what a source can make the operator
	// hold in memory.
	maxLayer    = 16 << 20
	maxUnpacked = 64 << 20
	maxManifest = 1 << 20
)

// SignedPayload is what the publisher signs: the layer's digest, domain
// separated so a signature over anything else never verifies here.
func SignedPayload(layer digest.Digest) []byte {
	return []byte("meshkeeper-catalog-v1\n" + layer.String())
}

// Source is a catalog artifact in a registry and how it is verified.
type Source struct {
	ref       registry.Reference
	key       ed25519.PublicKey
	plainHTTP bool
	cacheDir  string
}

// NewSource parses a reference, with or without the oci:// prefix
// ("oci://registry.example.com/meshkeeper/catalog:stable"). Without key the
// reference must pin a digest. plainHTTP talks HTTP instead of HTTPS (a
// registry on 127.0.0.1).
func NewSource(reference string, key ed25519.PublicKey, plainHTTP bool) (*Source, error) {
	ref, err := registry.ParseReference(strings.TrimPrefix(reference, "oci://"))
	if err != nil {
		return nil, fmt.Errorf("catalog source %q: %w; want oci://host/repository:tag or @sha256:<digest>", reference, err)
	}
	if ref.Reference == "" {
		return nil, fmt.Errorf("catalog source %q: no tag or digest; want oci://host/repository:tag", reference)
	}
	_, pinned := pinnedDigest(ref)
	if key == nil && !pinned {
		return nil, fmt.Errorf("catalog source %q: nothing to verify it with: give the publisher's public key (--catalog-public-key) or pin the artifact by digest (%s@sha256:...)", reference, ref.Registry+"/"+ref.Repository)
	}
	return &Source{ref: ref, key: key, plainHTTP: plainHTTP}, nil
}

func pinnedDigest(ref registry.Reference) (digest.Digest, bool) {
	d, err := ref.Digest()
	return d, err == nil
}

// String is the reference as configured, e.g. oci://host/repo:tag.
func (s *Source) String() string { return "oci://" + s.ref.String() }

// repository is where the artifact lives, e.g. host/repo.
func (s *Source) repository() string { return s.ref.Registry + "/" + s.ref.Repository }

func (s *Source) repo() (*remote.Repository, error) {
	r, err := remote.NewRepository(s.repository())
	if err != nil {
		return nil, err
	}
	r.PlainHTTP = s.plainHTTP
	return r, nil
}

// Resolve returns the digest the reference points at now.
func (s *Source) Resolve(ctx context.Context) (digest.Digest, error) {
	r, err := s.repo()
	if err != nil {
		return "", err
	}
	desc, err := r.Resolve(ctx, s.ref.Reference)
	if err != nil {
		return "", fmt.Errorf("resolve %s: %w", s, err)
	}
	return desc.Digest, nil
}

// Pull fetches the artifact, verifies it and loads its catalog; each bundle's
// Source is host/repository@<manifest digest>. It returns that digest too.
// With a cache directory the verified artifact is kept there (see Restore).
func (s *Source) Pull(ctx context.Context) (*bundle.Catalog, digest.Digest, error) {
	r, err := s.repo()
	if err != nil {
		return nil, "", err
	}
	desc, rc, err := r.FetchReference(ctx, s.ref.Reference)
	if err != nil {
		return nil, "", fmt.Errorf("fetch %s: %w", s, err)
	}
	defer rc.Close() //nolint:errcheck // read-only
	if desc.Size > maxManifest {
		return nil, "", fmt.Errorf("%s: manifest of %d bytes is larger than %d: refused", s, desc.Size, maxManifest)
	}
	raw, err := content.ReadAll(rc, desc)
	if err != nil {
		return nil, "", fmt.Errorf("%s: manifest does not match its digest: %w", s, err)
	}
	layer, err := s.verifyManifest(raw)
	if err != nil {
		return nil, "", err
	}
	lrc, err := r.Blobs().Fetch(ctx, layer)
	if err != nil {
		return nil, "", fmt.Errorf("%s: fetch layer %s: %w", s, layer.Digest, err)
	}
	defer lrc.Close() //nolint:errcheck // read-only
	blob, err := content.ReadAll(lrc, layer)
	if err != nil {
		return nil, "", fmt.Errorf("%s: layer does not match its digest %s (tampered or corrupt in the registry): %w", s, layer.Digest, err)
	}
	cat, err := s.load(digest.FromBytes(raw), layer, blob)
	if err != nil {
		return nil, "", err
	}
	if s.cacheDir != "" {
		if err := s.save(raw, blob); err != nil {
			return nil, "", fmt.Errorf("catalog cache %s: %w", s.cacheDir, err)
		}
	}
	return cat, digest.FromBytes(raw), nil
}

// WithCache keeps the last verified artifact in dir (the manager's
// --catalog-cache-dir), so a restarted operator has the releases it had even
// while the source does not answer.
func (s *Source) WithCache(dir string) *Source {
	c := *s
	c.cacheDir = dir
	return &c
}

// Restore loads the artifact the cache holds, verified again exactly as a
// pulled one (the cache is no more trusted than the registry). It returns
// fs.ErrNotExist when the cache is empty.
func (s *Source) Restore() (*bundle.Catalog, digest.Digest, error) {
	if s.cacheDir == "" {
		return nil, "", fs.ErrNotExist
	}
	raw, err := os.ReadFile(filepath.Join(s.cacheDir, cacheManifest))
	if err != nil {
		return nil, "", err
	}
	layer, err := s.verifyManifest(raw)
	if err != nil {
		return nil, "", fmt.Errorf("cached artifact: %w", err)
	}
	blob, err := os.ReadFile(filepath.Join(s.cacheDir, cacheLayer))
	if err != nil {
		return nil, "", err
	}
	if int64(len(blob)) != layer.Size || digest.FromBytes(blob) != layer.Digest {
		return nil, "", fmt.Errorf("cached artifact: layer in %s does not match its digest %s: refused", s.cacheDir, layer.Digest)
	}
	cat, err := s.load(digest.FromBytes(raw), layer, blob)
	if err != nil {
		return nil, "", err
	}
	return cat, digest.FromBytes(raw), nil
}

const (
	cacheManifest = "manifest.json"
	cacheLayer    = "layer.tar.gz"
)

// save writes the artifact, layer first, each by rename, so a crash leaves
// the old pair or a pair that fails verification, never a wrong catalog.
func (s *Source) save(manifest, layer []byte) error {
	if err := os.MkdirAll(s.cacheDir, 0o700); err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		data []byte
	}{{cacheLayer, layer}, {cacheManifest, manifest}} {
		tmp := filepath.Join(s.cacheDir, f.name+".tmp")
		if err := os.WriteFile(tmp, f.data, 0o600); err != nil {
			return err
		}
		if err := os.Rename(tmp, filepath.Join(s.cacheDir, f.name)); err != nil {
			return err
		}
	}
	return nil
}

// verifyManifest checks a manifest's bytes against the pinned digest (if
// any), its type and, with a key, its signature; it returns the layer.
func (s *Source) verifyManifest(raw []byte) (ocispec.Descriptor, error) {
	if want, pinned := pinnedDigest(s.ref); pinned && digest.FromBytes(raw) != want {
		return ocispec.Descriptor{}, fmt.Errorf("%s: manifest digest %s is not the pinned %s: refused", s, digest.FromBytes(raw), want)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%s: manifest: %w", s, err)
	}
	return s.checkManifest(m)
}

// load unpacks a verified layer into a catalog whose bundles name the
// artifact they came from.
func (s *Source) load(manifest digest.Digest, layer ocispec.Descriptor, blob []byte) (*bundle.Catalog, error) {
	fsys, err := untar(blob)
	if err != nil {
		return nil, fmt.Errorf("%s: layer %s: %w", s, layer.Digest, err)
	}
	at := s.repository() + "@" + manifest.String()
	cat, err := bundle.LoadFrom(fsys, at)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", at, err)
	}
	return cat, nil
}

// checkManifest returns the catalog layer once the manifest is a catalog
// artifact and, with a key, carries a valid signature over that layer.
func (s *Source) checkManifest(m ocispec.Manifest) (ocispec.Descriptor, error) {
	if m.ArtifactType != ArtifactType {
		return ocispec.Descriptor{}, fmt.Errorf("%s: artifactType %q, want %q: not a meshkeeper catalog", s, m.ArtifactType, ArtifactType)
	}
	if len(m.Layers) != 1 || m.Layers[0].MediaType != LayerMediaType {
		return ocispec.Descriptor{}, fmt.Errorf("%s: want exactly one layer of media type %s", s, LayerMediaType)
	}
	layer := m.Layers[0]
	if layer.Size > maxLayer || layer.Size < 0 {
		return ocispec.Descriptor{}, fmt.Errorf("%s: layer of %d bytes is larger than %d: refused", s, layer.Size, maxLayer)
	}
	if s.key == nil {
		return layer, nil // pinned by digest: the manifest names the layer's digest
	}
	sig, err := base64.StdEncoding.DecodeString(m.Annotations[SignatureAnnotation])
	if err != nil || len(sig) == 0 {
		return ocispec.Descriptor{}, fmt.Errorf("%s: no signature (annotation %s): refused; sign it with the publisher's key", s, SignatureAnnotation)
	}
	if !ed25519.Verify(s.key, SignedPayload(layer.Digest), sig) {
		return ocispec.Descriptor{}, fmt.Errorf("%s: signature does not verify with the configured public key for layer %s: refused", s, layer.Digest)
	}
	return layer, nil
}

// untar reads a gzipped tar of regular files into memory; paths must be
// clean and relative.
func untar(blob []byte) (fs.FS, error) {
	zr, err := gzip.NewReader(bytes.NewReader(blob))
	if err != nil {
		return nil, err
	}
	out := fstest.MapFS{}
	var total int64
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		name := strings.TrimPrefix(h.Name, "./")
		switch h.Typeflag {
		case tar.TypeDir:
			continue
		case tar.TypeReg:
		default:
			return nil, fmt.Errorf("%s: only regular files and directories are allowed", h.Name)
		}
		if !fs.ValidPath(name) || path.Clean(name) != name {
			return nil, fmt.Errorf("%q: not a clean relative path", h.Name)
		}
		total += h.Size
		if total > maxUnpacked {
			return nil, fmt.Errorf("unpacks to more than %d bytes: refused", maxUnpacked)
		}
		data, err := io.ReadAll(io.LimitReader(tr, h.Size))
		if err != nil {
			return nil, err
		}
		out[name] = &fstest.MapFile{Data: data, Mode: 0o444}
	}
	return out, nil
}

// Pack writes the catalog/ and charts/ trees of fsys as the gzipped tar a
// catalog layer holds, reproducibly (sorted, no times, no owners).
func Pack(fsys fs.FS) ([]byte, error) {
	var names []string
	for _, root := range []string{"catalog", "charts"} {
		err := fs.WalkDir(fsys, root, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				names = append(names, p)
			}
			return err
		})
		if err != nil {
			return nil, err
		}
	}
	slices.Sort(names)
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for _, n := range names {
		data, err := fs.ReadFile(fsys, n)
		if err != nil {
			return nil, err
		}
		if err := tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0)}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Publish pushes fsys (a tree laid out like bundles/) to reference
// (host/repo:tag) as a catalog artifact signed with key (nil: unsigned),
// after checking it loads as a catalog. It returns the manifest's digest.
func Publish(ctx context.Context, reference string, fsys fs.FS, key ed25519.PrivateKey, plainHTTP bool) (digest.Digest, error) {
	if _, err := bundle.Load(fsys); err != nil {
		return "", fmt.Errorf("not a valid catalog: %w", err)
	}
	layer, err := Pack(fsys)
	if err != nil {
		return "", err
	}
	ld := content.NewDescriptorFromBytes(LayerMediaType, layer)
	var sig []byte
	if key != nil {
		sig = ed25519.Sign(key, SignedPayload(ld.Digest))
	}
	return PublishLayer(ctx, reference, layer, sig, plainHTTP)
}

// PublishLayer pushes a prepared layer with a given signature (nil: none).
// Tests use it to publish what an attacker could: content and a signature
// that do not belong together.
func PublishLayer(ctx context.Context, reference string, layer, sig []byte, plainHTTP bool) (digest.Digest, error) {
	ref, err := registry.ParseReference(strings.TrimPrefix(reference, "oci://"))
	if err != nil {
		return "", err
	}
	r, err := remote.NewRepository(ref.Registry + "/" + ref.Repository)
	if err != nil {
		return "", err
	}
	r.PlainHTTP = plainHTTP
	ld := content.NewDescriptorFromBytes(LayerMediaType, layer)
	if err := r.Push(ctx, ld, bytes.NewReader(layer)); err != nil && !strings.Contains(err.Error(), "already exists") {
		return "", fmt.Errorf("push layer: %w", err)
	}
	ann := map[string]string{ocispec.AnnotationCreated: "1970-01-01T00:00:00Z"}
	if sig != nil {
		ann[SignatureAnnotation] = base64.StdEncoding.EncodeToString(sig)
	}
	desc, err := oras.PackManifest(ctx, r, oras.PackManifestVersion1_1, ArtifactType, oras.PackManifestOptions{
		Layers: []ocispec.Descriptor{ld}, ManifestAnnotations: ann,
	})
	if err != nil {
		return "", fmt.Errorf("push manifest: %w", err)
	}
	if ref.Reference != "" {
		if err := r.Tag(ctx, desc, ref.Reference); err != nil {
			return "", fmt.Errorf("tag %s: %w", ref.Reference, err)
		}
	}
	return desc.Digest, nil
}

// ParsePublicKey reads a PEM "PUBLIC KEY" (PKIX) ed25519 key, as
// `openssl pkey -pubout` writes it.
func ParsePublicKey(pemBytes []byte) (ed25519.PublicKey, error) {
	blk, _ := pem.Decode(pemBytes)
	if blk == nil || blk.Type != "PUBLIC KEY" {
		return nil, errors.New("not a PEM PUBLIC KEY block")
	}
	k, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, err
	}
	pub, ok := k.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("a %T key, want ed25519", k)
	}
	return pub, nil
}

// ParsePrivateKey reads a PEM "PRIVATE KEY" (PKCS #8) ed25519 key, as
// `openssl genpkey -algorithm ed25519` writes it.
func ParsePrivateKey(pemBytes []byte) (ed25519.PrivateKey, error) {
	blk, _ := pem.Decode(pemBytes)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, errors.New("not a PEM PRIVATE KEY block")
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, err
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("a %T key, want ed25519", k)
	}
	return priv, nil
}
