package oci_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
	"testing/fstest"
	"time"

	. "github.com/onsi/gomega"
	"github.com/opencontainers/go-digest"

	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/bundle/oci"
	"github.com/meshkeeper/meshkeeper/test/registry"
)

// fixture is a real registry (CNCF distribution on 127.0.0.1) and a
// publisher's key pair.
type fixture struct {
	reg  *registry.Registry
	pub  ed25519.PublicKey
	priv ed25519.PrivateKey
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	reg := registry.Start(context.Background(), t)
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{reg: reg, pub: pub, priv: priv}
}

func (f *fixture) ref(repoTag string) string { return "oci://" + f.reg.Addr + "/" + repoTag }

// tree is the embedded catalog plus the releases given (copied from
// 1.27.3), the way a release team would publish a new patch.
func tree(t *testing.T, versions ...string) fstest.MapFS {
	t.Helper()
	tr, err := registry.CatalogTree()
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range versions {
		if err := registry.AddRelease(tr, "1.27.3", v); err != nil {
			t.Fatal(err)
		}
	}
	return tr
}

// TestPullVerifiesAndMerges: a signed catalog published to a real registry
// is pulled, verified and merged: the new patch comes from the registry
// (reference@digest), the releases the binary embeds stay "embedded".
func TestPullVerifiesAndMerges(t *testing.T) {
	g := NewWithT(t)
	f := newFixture(t)
	ctx := context.Background()

	d, err := oci.Publish(ctx, f.ref("meshkeeper/catalog:stable"), tree(t, "1.27.4"), f.priv, true)
	g.Expect(err).NotTo(HaveOccurred())

	src, err := oci.NewSource(f.ref("meshkeeper/catalog:stable"), f.pub, true)
	g.Expect(err).NotTo(HaveOccurred())
	resolved, err := src.Resolve(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(resolved).To(Equal(d))

	cat, pulled, err := src.Pull(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(pulled).To(Equal(d))
	g.Expect(cat.Versions()).To(Equal([]string{"1.26.4", "1.27.2", "1.27.3", "1.27.4", "1.28.2"}))

	merged, err := bundle.Merge(bundle.Default(), cat)
	g.Expect(err).NotTo(HaveOccurred(), "the embedded releases in the artifact are byte-identical to the binary's")
	from := map[string]string{}
	for _, b := range merged.Bundles() {
		from[b.Version] = b.Source
	}
	g.Expect(from).To(Equal(map[string]string{
		"1.26.4": "embedded", "1.27.2": "embedded", "1.27.3": "embedded", "1.28.2": "embedded",
		"1.27.4": f.reg.Addr + "/meshkeeper/catalog@" + d.String(),
	}))
	b, err := merged.Resolve("1.27")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(b.Version).To(Equal("1.27.4"), "spec.version 1.27 now resolves to the published patch")
	g.Expect(b.Images["pilot"]).To(Equal("docker.io/istio/pilot:1.27.4"))
	chart, err := b.Chart(bundle.Istiod)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(chart).NotTo(BeNil(), "the remote bundle installs the charts its artifact carries")

	// Pinned by digest, no key: exactly that artifact is accepted.
	pinned, err := oci.NewSource("oci://"+f.reg.Addr+"/meshkeeper/catalog@"+d.String(), nil, true)
	g.Expect(err).NotTo(HaveOccurred())
	_, pd, err := pinned.Pull(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(pd).To(Equal(d))

	_, err = oci.NewSource(f.ref("meshkeeper/catalog:stable"), nil, true)
	g.Expect(err).To(MatchError(ContainSubstring("nothing to verify it with")), "a tag without a key is refused at start")
}

// TestTamperedArtifactsAreRefused: whatever an attacker with write access
// to the registry (but not the publisher's key) does, nothing of it is
// merged, and the error says why.
func TestTamperedArtifactsAreRefused(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	good, err := oci.Pack(tree(t, "1.27.4"))
	if err != nil {
		t.Fatal(err)
	}
	goodSig := ed25519.Sign(f.priv, oci.SignedPayload(digest.FromBytes(good)))
	evil, err := oci.Pack(tree(t, "1.27.4", "1.27.9"))
	if err != nil {
		t.Fatal(err)
	}
	_, otherKey, _ := ed25519.GenerateKey(rand.Reader)

	cases := []struct {
		name    string
		publish func(ref string) error
		want    string
	}{
		{name: "other content under the publisher's signature", want: "signature does not verify", publish: func(ref string) error {
			_, err := oci.PublishLayer(ctx, ref, evil, goodSig, true)
			return err
		}},
		{name: "signed with another key", want: "signature does not verify", publish: func(ref string) error {
			_, err := oci.Publish(ctx, ref, tree(t, "1.27.9"), otherKey, true)
			return err
		}},
		{name: "unsigned", want: "no signature", publish: func(ref string) error {
			_, err := oci.Publish(ctx, ref, tree(t, "1.27.9"), nil, true)
			return err
		}},
		{name: "the layer's bytes changed in the registry's storage", want: "does not match its digest", publish: func(ref string) error {
			if _, err := oci.PublishLayer(ctx, ref, good, goodSig, true); err != nil {
				return err
			}
			path := f.reg.BlobPath(digest.FromBytes(good).String())
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			data[len(data)/2] ^= 0xff // same size, other bytes
			return os.WriteFile(path, data, 0o600)
		}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			ref := f.ref("meshkeeper/tampered" + string(rune('a'+i)) + ":stable")
			g.Expect(tc.publish(ref)).To(Succeed())
			src, err := oci.NewSource(ref, f.pub, true)
			g.Expect(err).NotTo(HaveOccurred())
			cat, _, err := src.Pull(ctx)
			g.Expect(err).To(MatchError(ContainSubstring(tc.want)))
			g.Expect(cat).To(BeNil())

			live := bundle.NewLive(bundle.Default(), src.String())
			(&oci.Poller{Source: src, Interval: time.Hour, Live: live}).Check(ctx)
			g.Expect(live.Catalog()).To(BeIdenticalTo(bundle.Default()), "nothing of a refused artifact is merged")
			g.Expect(live.State().Message).To(ContainSubstring(tc.want))
			g.Expect(live.State().LastChecked).NotTo(BeZero())
		})
	}
}

// TestRemoteCannotReplaceAnEmbeddedRelease: an artifact carrying 1.27.3
// with other content than the binary's is refused for that release, with a
// message naming both; its other, new releases are still merged.
func TestRemoteCannotReplaceAnEmbeddedRelease(t *testing.T) {
	g := NewWithT(t)
	f := newFixture(t)
	ctx := context.Background()
	tr := tree(t, "1.27.4")
	tr["catalog/1.27.3.yaml"].Data = append([]byte("# changed\n"), tr["catalog/1.27.3.yaml"].Data...)
	_, err := oci.Publish(ctx, f.ref("meshkeeper/catalog:stable"), tr, f.priv, true)
	g.Expect(err).NotTo(HaveOccurred())
	src, err := oci.NewSource(f.ref("meshkeeper/catalog:stable"), f.pub, true)
	g.Expect(err).NotTo(HaveOccurred())

	live := bundle.NewLive(bundle.Default(), src.String())
	(&oci.Poller{Source: src, Interval: time.Hour, Live: live}).Check(ctx)
	g.Expect(live.State().Message).To(MatchRegexp(`bundle 1\.27\.3 from .*meshkeeper/catalog@sha256:[0-9a-f]+ differs from the 1\.27\.3 already in the catalog \(from embedded\): kept the one from embedded`))
	b, err := live.Catalog().Resolve("1.27.3")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(b.Source).To(Equal("embedded"))
	want, _ := bundle.Default().Resolve("1.27.3")
	g.Expect(b).To(BeIdenticalTo(want))
	b, err = live.Catalog().Resolve("1.27.4")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(b.Source).To(ContainSubstring("/meshkeeper/catalog@sha256:"))
}

// TestPollerKeepsTheCatalogWhenTheRegistryIsDown: the registry going away
// changes nothing but status: the releases already merged stay, the check
// time moves on and the message says why; when it is back, so is a clean
// state.
func TestPollerKeepsTheCatalogWhenTheRegistryIsDown(t *testing.T) {
	g := NewWithT(t)
	f := newFixture(t)
	ctx := context.Background()
	_, err := oci.Publish(ctx, f.ref("meshkeeper/catalog:stable"), tree(t, "1.27.4"), f.priv, true)
	g.Expect(err).NotTo(HaveOccurred())
	src, err := oci.NewSource(f.ref("meshkeeper/catalog:stable"), f.pub, true)
	g.Expect(err).NotTo(HaveOccurred())
	live := bundle.NewLive(bundle.Default(), src.String())
	checks := 0
	p := &oci.Poller{Source: src, Interval: time.Hour, Live: live, Checked: func() { checks++ }}

	p.Check(ctx)
	g.Expect(live.State().Message).To(BeEmpty())
	before := live.Catalog()
	g.Expect(before.Versions()).To(ContainElement("1.27.4"))
	firstCheck := live.State().LastChecked

	f.reg.Stop()
	time.Sleep(10 * time.Millisecond)
	p.Check(ctx)
	g.Expect(live.Catalog()).To(BeIdenticalTo(before), "the registry going down changes nothing")
	g.Expect(live.State().Message).To(ContainSubstring("connection refused"))
	g.Expect(live.State().LastChecked).To(BeTemporally(">", firstCheck))
	g.Expect(live.State().Digest).NotTo(BeEmpty(), "the last verified digest is remembered")

	g.Expect(f.reg.Restart(ctx)).To(Succeed())
	p.Check(ctx)
	g.Expect(live.Catalog()).To(BeIdenticalTo(before), "the same artifact again: nothing to merge")
	g.Expect(live.State().Message).To(BeEmpty())
	g.Expect(checks).To(Equal(3))
}

// TestRestartWithTheRegistryDown: with a cache directory, an operator
// restarted while the registry is down still has the releases it merged;
// the cache is verified like the registry (a changed byte is refused).
func TestRestartWithTheRegistryDown(t *testing.T) {
	g := NewWithT(t)
	f := newFixture(t)
	ctx := context.Background()
	cache := t.TempDir()
	d, err := oci.Publish(ctx, f.ref("meshkeeper/catalog:stable"), tree(t, "1.27.4"), f.priv, true)
	g.Expect(err).NotTo(HaveOccurred())
	src, err := oci.NewSource(f.ref("meshkeeper/catalog:stable"), f.pub, true)
	g.Expect(err).NotTo(HaveOccurred())
	src = src.WithCache(cache)
	(&oci.Poller{Source: src, Interval: time.Hour, Live: bundle.NewLive(bundle.Default(), src.String())}).Check(ctx)

	f.reg.Stop()
	restarted := bundle.NewLive(bundle.Default(), src.String())
	p := &oci.Poller{Source: src, Interval: time.Hour, Live: restarted}
	p.Restore(ctx)
	p.Check(ctx)
	g.Expect(restarted.Catalog().Versions()).To(ContainElement("1.27.4"), "the release merged before the restart")
	b, err := restarted.Catalog().Resolve("1.27.4")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(b.Source).To(Equal(f.reg.Addr + "/meshkeeper/catalog@" + d.String()))
	g.Expect(restarted.State().Message).To(ContainSubstring("connection refused"))

	// A cache someone edited is refused.
	layer := filepath.Join(cache, "layer.tar.gz")
	data, err := os.ReadFile(layer)
	g.Expect(err).NotTo(HaveOccurred())
	data[len(data)/2] ^= 0xff
	g.Expect(os.WriteFile(layer, data, 0o600)).To(Succeed())
	_, _, err = src.Restore()
	g.Expect(err).To(MatchError(ContainSubstring("does not match its digest")))
	again := bundle.NewLive(bundle.Default(), src.String())
	(&oci.Poller{Source: src, Interval: time.Hour, Live: again}).Restore(ctx)
	g.Expect(again.Catalog()).To(BeIdenticalTo(bundle.Default()))
}
