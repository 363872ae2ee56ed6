package controller

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/event"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// TestAutomaticMinorUpgrades is upgrade.minor: Automatic on the local
// cluster, with the embedded catalog (1.26.4, 1.27.x, 1.28.2): by default
// (minor: Manual) a Mesh on spec.version "1.26" stays on 1.26 although newer
// minors are catalogued; opting in makes the next minor the target, which
// waits for the maintenance window like a patch, then rolls out one minor
// at a time, each hop its own canary rollout, to the newest minor, while
// spec.version stays "1.26".
func TestAutomaticMinorUpgrades(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()

	// Saturday 2026-03-07 01:00 UTC: the window (02:00, 4h) is closed.
	saturday := time.Date(2026, time.March, 7, 1, 0, 0, 0, time.UTC)
	windowClock.Set(saturday.Add(90 * time.Minute)) // 02:30: open while minor is Manual
	t.Cleanup(func() { windowClock.Set(time.Time{}) })
	// The window clock moves without an event; a check of the catalog
	// source is one the reconciler listens to.
	nudge := func() {
		select {
		case catalogChecked <- event.GenericEvent{Object: &meshv1.Mesh{}}:
		default:
		}
	}

	namespaces := []string{"mn-canary", "mn-a"}
	for _, ns := range namespaces {
		mkNS(g, ns, map[string]string{"mn-mesh": "on"})
	}
	mesh := automaticMesh("1.26", "mn-mesh", "mn-canary")
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).ShouldNot(BeNil())
	g.Expect(getMesh().Status.Version).To(Equal(meshv1.VersionStatus{Installed: "1.26.4", Target: "1.26.4"}))

	t.Run("minor: Manual (the default) stays on the minor of spec.version", func(t *testing.T) {
		g := NewWithT(t)
		nudge()
		g.Consistently(func() meshv1.VersionStatus { return getMesh().Status.Version }).WithTimeout(3*time.Second).
			Should(Equal(meshv1.VersionStatus{Installed: "1.26.4", Target: "1.26.4"}),
				"1.27 and 1.28 are catalogued, but only patches are followed, inside an open window too")
		g.Expect(getMesh().Status.Rollout).To(BeNil())
	})

	t.Run("minor: Automatic makes the next minor the target, held outside the window", func(t *testing.T) {
		g := NewWithT(t)
		windowClock.Set(saturday) // 01:00: closed
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Upgrade.Minor = meshv1.UpgradeAutomatic })
		g.Eventually(func() *metav1.Condition { return readyCondition(getMesh()) }).Should(HaveField("Message", And(
			ContainSubstring("1.27.3 is available"),
			ContainSubstring("next maintenance window (2026-03-07T02:00:00Z)"))))
		g.Expect(getMesh().Status.Version).To(Equal(meshv1.VersionStatus{Installed: "1.26.4", Target: "1.27.3"}),
			"one minor at a time: 1.27.3, not 1.28.2")
		held := func() error {
			m := getMesh()
			if m.Status.Rollout != nil || m.Status.Version.Installed != "1.26.4" {
				return fmt.Errorf("installed %s, rollout %+v", m.Status.Version.Installed, m.Status.Rollout)
			}
			if names := releaseNames(g); strings.Contains(strings.Join(names, ","), "istiod-1-27-3") {
				return fmt.Errorf("releases %v", names)
			}
			return nil
		}
		nudge()
		g.Consistently(held).WithTimeout(3*time.Second).Should(Succeed(),
			"outside the window an automatic minor upgrade does not start, not even the new control plane")
		g.Expect(meshReady()).NotTo(BeNil(), "the Mesh stays Ready on what it runs")
	})

	t.Run("inside the window it moves one minor at a time to the newest", func(t *testing.T) {
		g := NewWithT(t)
		windowClock.Set(saturday.Add(90 * time.Minute))
		nudge()
		g.Eventually(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).Should(
			And(Not(BeNil()), HaveField("From", "1.26.4"), HaveField("To", "1.27.3")), "the first hop, a canary rollout")
		g.Eventually(func() meshv1.VersionStatus {
			nudge()
			return getMesh().Status.Version
		}).WithTimeout(2 * time.Minute).Should(Equal(meshv1.VersionStatus{Installed: "1.28.2", Target: "1.28.2"}))
		g.Eventually(meshReady).ShouldNot(BeNil())
		m := getMesh()
		var hops []string
		for _, h := range m.Status.History {
			hops = append(hops, h.Version+" "+string(h.Outcome))
		}
		g.Expect(hops).To(ContainElements("1.27.3 Succeeded", "1.28.2 Succeeded"))
		g.Expect(strings.Join(hops, ",")).To(ContainSubstring("1.27.3 Succeeded,1.28.2 Succeeded"),
			"1.27.3 first, then 1.28.2: two rollouts, never a jump over a minor")
		g.Expect(m.Spec.Version).To(Equal("1.26"), "the operator never writes the spec")
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-28-2"), ns)
		}
		nudge()
		g.Consistently(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).WithTimeout(2*time.Second).
			Should(BeNil(), "no newer minor is catalogued: it stays")
	})
}
