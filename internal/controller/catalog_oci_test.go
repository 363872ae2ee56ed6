package controller

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	"github.com/opencontainers/go-digest"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/event"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/bundle/oci"
	"github.com/meshkeeper/meshkeeper/test/registry"
)

// TestAutomaticUpgradeFromRegistry is the catalog that updates itself, end to
// end: a real OCI registry (CNCF distribution on 127.0.0.1) serves a signed
// catalog the operator polls; the Mesh follows spec.version "1.29" with
// upgrade.automatic and a Saturday-night window. A new patch published
// there is merged and shown in status, but waits while the window is
// closed; a tampered artifact and the registry going down change nothing;
// when the window opens the new patch rolls out as a canary by itself.
// The suite's reconciler resolves against this test's catalog until it ends.
func TestAutomaticUpgradeFromRegistry(t *testing.T) {
	g := NewWithT(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)

	reg := registry.Start(ctx, t)
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	g.Expect(err).NotTo(HaveOccurred())
	ref := "oci://" + reg.Addr + "/meshkeeper/catalog:stable"
	publish := func(versions ...string) digest.Digest {
		tree, err := registry.CatalogTree()
		g.Expect(err).NotTo(HaveOccurred())
		for _, v := range versions {
			g.Expect(registry.AddRelease(tree, "1.28.2", v, "1.28", "1.29")).To(Succeed())
		}
		d, err := oci.Publish(ctx, ref, tree, priv, true)
		g.Expect(err).NotTo(HaveOccurred())
		return d
	}
	d0 := publish("1.29.0")

	src, err := oci.NewSource(ref, pub, true)
	g.Expect(err).NotTo(HaveOccurred())
	liveCatalog := bundle.NewLive(bundle.Default(), src.String())
	suiteCatalog.Use(t, liveCatalog)
	poller := &oci.Poller{Source: src, Interval: 500 * time.Millisecond, Live: liveCatalog, Checked: func() {
		select {
		case catalogChecked <- event.GenericEvent{Object: &meshv1.Mesh{}}:
		default:
		}
	}}
	go func() { _ = poller.Start(ctx) }()

	// Saturday 2026-03-07 01:00 UTC: the window (02:00, 4h) is closed.
	saturday := time.Date(2026, time.March, 7, 1, 0, 0, 0, time.UTC)
	windowClock.Set(saturday)
	t.Cleanup(func() { windowClock.Set(time.Time{}) })

	namespaces := []string{"oc-canary", "oc-a"}
	for _, ns := range namespaces {
		mkNS(g, ns, map[string]string{"oc-mesh": "on"})
	}
	g.Eventually(func() []string { return liveCatalog.Catalog().Versions() }).Should(ContainElement("1.29.0"))
	mesh := automaticMesh("1.29", "oc-mesh", "oc-canary")
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).ShouldNot(BeNil())
	m := getMesh()
	g.Expect(m.Status.Version.Installed).To(Equal("1.29.0"), "a release only the registry has installs like an embedded one")
	fromRegistry := reg.Addr + "/meshkeeper/catalog@"
	g.Expect(m.Status.Catalog).NotTo(BeNil())
	g.Expect(m.Status.Catalog.Bundles).To(ContainElements(
		meshv1.CatalogBundle{Version: "1.28.2", From: "embedded"},
		meshv1.CatalogBundle{Version: "1.29.0", From: fromRegistry + d0.String()}))

	var d1 digest.Digest
	t.Run("a new patch in the registry is found, but waits for the window", func(t *testing.T) {
		g := NewWithT(t)
		d1 = publish("1.29.0", "1.29.1")
		g.Eventually(func() []meshv1.CatalogBundle { return getMesh().Status.Catalog.Bundles }).
			Should(ContainElement(meshv1.CatalogBundle{Version: "1.29.1", From: fromRegistry + d1.String()}))
		m := getMesh()
		g.Expect(m.Status.Catalog.Digest).To(Equal(d1.String()))
		g.Expect(m.Status.Catalog.Source).To(Equal(ref))
		g.Expect(m.Status.Version.Target).To(Equal("1.29.1"))
		g.Eventually(func() *metav1.Condition { return readyCondition(getMesh()) }).Should(HaveField("Message", And(
			ContainSubstring("1.29.1 is available (from "+fromRegistry+d1.String()+")"),
			ContainSubstring("next maintenance window (2026-03-07T02:00:00Z)"))))

		checked := getMesh().Status.Catalog.LastCheckedAt
		held := func() error {
			m := getMesh()
			if m.Status.Rollout != nil || m.Status.Version.Installed != "1.29.0" {
				return fmt.Errorf("installed %s, rollout %+v", m.Status.Version.Installed, m.Status.Rollout)
			}
			if names := releaseNames(g); strings.Contains(strings.Join(names, ","), "istiod-1-29-1") {
				return fmt.Errorf("releases %v", names)
			}
			return nil
		}
		g.Consistently(held).WithTimeout(4*time.Second).Should(Succeed(),
			"outside the window an automatic upgrade does not start, not even the new control plane")
		g.Expect(getMesh().Status.Catalog.LastCheckedAt.Time).To(BeTemporally(">", checked.Time), "the source is checked all along")
		g.Expect(meshReady()).NotTo(BeNil(), "the Mesh stays Ready on what it runs")
		plan := getMesh().Status.Plan
		g.Expect(plan).NotTo(BeEmpty(), "the waiting upgrade is published as a dry run")
		for _, s := range plan {
			g.Expect(s.State).To(Equal(meshv1.StepPending), "%s %s has not started", s.Action, s.Target)
		}
		g.Expect(plan[0]).To(And(HaveField("Action", "UpgradeControlPlane"), HaveField("Target", "1.29.1")))
	})

	t.Run("a tampered artifact is refused", func(t *testing.T) {
		g := NewWithT(t)
		tree, err := registry.CatalogTree()
		g.Expect(err).NotTo(HaveOccurred())
		for _, v := range []string{"1.29.0", "1.29.1", "1.29.2"} {
			g.Expect(registry.AddRelease(tree, "1.28.2", v, "1.28", "1.29")).To(Succeed())
		}
		evil, err := oci.Pack(tree)
		g.Expect(err).NotTo(HaveOccurred())
		// The signature of another layer: what someone with write access to
		// the registry but without the publisher's key can attach.
		sig := ed25519.Sign(priv, oci.SignedPayload(digest.FromString("another layer")))
		_, err = oci.PublishLayer(ctx, ref, evil, sig, true)
		g.Expect(err).NotTo(HaveOccurred())
		g.Eventually(func() string { return getMesh().Status.Catalog.Message }).Should(ContainSubstring("signature does not verify"))
		m := getMesh()
		g.Expect(m.Status.Catalog.Digest).To(Equal(d1.String()), "the last verified artifact is what the catalog holds")
		g.Expect(m.Status.Catalog.Bundles).NotTo(ContainElement(HaveField("Version", "1.29.2")))
		g.Expect(m.Status.Version.Target).To(Equal("1.29.1"))
	})

	t.Run("the registry going down changes nothing", func(t *testing.T) {
		g := NewWithT(t)
		reg.Stop()
		g.Eventually(func() string { return getMesh().Status.Catalog.Message }).Should(ContainSubstring("connection refused"))
		m := getMesh()
		g.Expect(m.Status.Catalog.Bundles).To(ContainElement(meshv1.CatalogBundle{Version: "1.29.1", From: fromRegistry + d1.String()}))
		g.Expect(m.Status.Version).To(Equal(meshv1.VersionStatus{Installed: "1.29.0", Target: "1.29.1"}))
		g.Expect(m.Status.Rollout).To(BeNil())
	})

	t.Run("inside the window the new patch rolls out by itself, registry down or not", func(t *testing.T) {
		g := NewWithT(t)
		windowClock.Set(saturday.Add(90 * time.Minute)) // 02:30, the window is open
		g.Eventually(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).Should(
			And(Not(BeNil()), HaveField("From", "1.29.0"), HaveField("To", "1.29.1")), "a canary rollout, as for any version change")
		g.Eventually(lastHistory).Should(And(HaveField("Version", "1.29.1"), HaveField("Outcome", meshv1.OutcomeSucceeded)))
		g.Eventually(meshReady).ShouldNot(BeNil())
		m := getMesh()
		g.Expect(m.Status.Version.Installed).To(Equal("1.29.1"))
		g.Expect(m.Spec.Version).To(Equal("1.29"), "the operator never writes the spec")
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-29-1"), ns)
		}
		g.Expect(eventReasonsFor(g, m.UID)).To(ContainElements("RolloutStarted", "NodeWaveStarted", "WaveStarted", "RolloutSucceeded"))
	})
}

// automaticMesh is a Mesh on spec.version that upgrades by itself, only in a
// Saturday 02:00 UTC window of 4h, selecting the namespaces labelled
// label=on: canary first, then the rest in one wave, with no bake, so an
// upgrade goes through as soon as it may start.
func automaticMesh(version, label, canary string) *meshv1.Mesh {
	return &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    version,
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{label: "on"}}},
			Rollout: meshv1.RolloutSpec{
				Nodes: meshv1.NodeRolloutSpec{Bake: &metav1.Duration{}},
				Namespaces: meshv1.NamespaceRolloutSpec{
					Canary: []string{canary}, Waves: []string{"100%"}, Bake: &metav1.Duration{},
				}, RetireAfter: &metav1.Duration{}},
			Upgrade: meshv1.UpgradeSpec{Automatic: ptr(true), Windows: []meshv1.MaintenanceWindow{
				{Cron: "0 2 * * 6", Duration: metav1.Duration{Duration: 4 * time.Hour}}}},
		},
	}
}
