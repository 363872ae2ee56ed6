package controller

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	eventsv1 "k8s.io/api/events/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// TestUpgradeTwoMinorsGoesThrough127 sets spec.version two minors ahead of
// what runs: the mesh moves one minor at a time, 1.26 → 1.27 → 1.28, each
// hop a rollout of its own recorded in status.history, and says it is Ready
// only once 1.28 runs everywhere.
func TestUpgradeTwoMinorsGoesThrough127(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()

	// Its own selector label keeps this Mesh away from other tests' namespaces.
	namespaces := []string{"tm-canary", "tm-a", "tm-b"}
	for _, ns := range namespaces {
		mkNS(g, ns, map[string]string{"tm-mesh": "on"})
	}
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.26",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"tm-mesh": "on"}}},
			// No Prometheus, no bake, no grace period: the waves move as soon
			// as the components serve, the old revision goes right after.
			Rollout: meshv1.RolloutSpec{Namespaces: meshv1.NamespaceRolloutSpec{
				Canary: []string{"tm-canary"}, Waves: []string{"100%"}, Bake: &metav1.Duration{},
			}, RetireAfter: &metav1.Duration{}},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).ShouldNot(BeNil())
	g.Expect(getMesh().Status.Version.Installed).To(Equal("1.26.4"))
	before := len(getMesh().Status.History)

	rec := recordMesh(t)
	start := time.Now()
	updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.28" })
	gen := getMesh().Generation
	g.Eventually(func() []string { return outcomes(getMesh().Status.History[before:]) }).WithTimeout(slow).
		Should(Equal([]string{"1.27.3 Succeeded", "1.28.2 Succeeded"}), "one minor at a time, in order")
	g.Eventually(meshReady).ShouldNot(BeNil())
	t.Logf("1.26.4 → 1.27.3 → 1.28.2 (two rollouts, bake 0, no analysis) Ready in %s", time.Since(start).Round(time.Millisecond))

	m := getMesh()
	g.Expect(m.Status.Version).To(Equal(meshv1.VersionStatus{Installed: "1.28.2", Target: "1.28.2"}))
	for _, ns := range namespaces {
		g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-28-2"), ns)
	}
	g.Expect(releaseNames(g)).To(And(ContainElement("istiod-1-28-2"),
		Not(ContainElement("istiod-1-26-4")), Not(ContainElement("istiod-1-27-3"))), "both old revisions are retired")

	// What the Mesh said along the way, every version the API server sent.
	seen := rec.stop()
	var hops []string
	for _, s := range seen {
		if ro := s.Status.Rollout; ro != nil && (len(hops) == 0 || hops[len(hops)-1] != ro.From+" → "+ro.To) {
			hops = append(hops, ro.From+" → "+ro.To)
		}
	}
	g.Expect(hops).To(Equal([]string{"1.26.4 → 1.27.3", "1.27.3 → 1.28.2"}), "never 1.26 straight to 1.28")
	for _, s := range seen {
		if s.Generation != gen || s.Status.ObservedGeneration != gen || !meta.IsStatusConditionTrue(s.Status.Conditions, meshv1.ConditionReady) {
			continue
		}
		g.Expect(s.Status.Version.Installed).To(Equal("1.28.2"),
			"Ready=True for the spec's generation (%q) while %s is installed (resourceVersion %s): `kubectl wait --for=condition=Ready` would return in the middle of the upgrade",
			readyCondition(&s).Message, s.Status.Version.Installed, s.ResourceVersion)
	}
}

// TestMaintenanceWindowHoldsWaves: outside every maintenance window the new
// control plane is installed beside the old one, but no namespace moves;
// the status says it waits for a window. A fresh install is not gated.
func TestMaintenanceWindowHoldsWaves(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()

	// A window that opens once a year at 00:00 UTC on the 1st of a month
	// months away from now, so it is closed for the whole test.
	now := time.Now().UTC()
	month := (int(now.Month())+5)%12 + 1
	window := meshv1.MaintenanceWindow{Cron: fmt.Sprintf("0 0 1 %d *", month), Duration: metav1.Duration{Duration: time.Hour}}
	opens := time.Date(now.Year(), time.Month(month), 1, 0, 0, 0, 0, time.UTC)
	if !opens.After(now) {
		opens = opens.AddDate(1, 0, 0)
	}

	namespaces := []string{"mw-canary", "mw-a", "mw-b"}
	for _, ns := range namespaces {
		mkNS(g, ns, map[string]string{"mw-mesh": "on"})
	}
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.26",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"mw-mesh": "on"}}},
			Rollout: meshv1.RolloutSpec{Namespaces: meshv1.NamespaceRolloutSpec{
				Canary: []string{"mw-canary"}, Waves: []string{"100%"}, Bake: &metav1.Duration{},
			}, RetireAfter: &metav1.Duration{}},
			Upgrade: meshv1.UpgradeSpec{Windows: []meshv1.MaintenanceWindow{window}},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)

	t.Run("a fresh install does not wait for a window", func(t *testing.T) {
		g := NewWithT(t)
		g.Eventually(meshReady).ShouldNot(BeNil())
		g.Expect(getMesh().Status.Version.Installed).To(Equal("1.26.4"))
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-26-4"), ns)
		}
	})

	t.Run("outside the window the new revision is installed, nothing else moves and no node or namespace wave starts", func(t *testing.T) {
		g := NewWithT(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27" })
		g.Eventually(func() string {
			if ro := getMesh().Status.Rollout; ro != nil {
				return ro.Message
			}
			return ""
		}).Should(And(ContainSubstring("maintenance window"), ContainSubstring(opens.Format(time.RFC3339))),
			"the status says what the rollout waits for and when the window opens")
		g.Expect(releaseNames(g)).To(ContainElements("istiod-1-26-4", "istiod-1-27-3"), "the new control plane runs beside the old one")
		g.Expect(componentsByName(getMesh())).To(And(
			HaveKeyWithValue("istiod", And(HaveField("Version", "1.27.3"), HaveField("Ready", true))),
			HaveKeyWithValue("ztunnel", HaveField("Version", "1.26.4")),
			HaveKeyWithValue("node-agent", HaveField("Version", "1.26.4"))),
			"outside a window the node components stay where they are")

		held := func() error {
			m := getMesh()
			ro := m.Status.Rollout
			if ro == nil || ro.Wave != 0 || ro.Step != meshv1.RolloutStepNodes {
				return fmt.Errorf("rollout %+v", ro)
			}
			for _, ns := range namespaces {
				if rev := labelsOf(ns)[meshv1.LabelRevision]; rev != "1-26-4" {
					return fmt.Errorf("namespace %s on revision %q", ns, rev)
				}
			}
			return nil
		}
		g.Consistently(held).WithTimeout(8*time.Second).WithPolling(250*time.Millisecond).Should(Succeed(),
			"no wave starts and no namespace moves while every window is closed")
		g.Expect(readyCondition(getMesh())).To(And(HaveField("Status", metav1.ConditionFalse),
			HaveField("Message", ContainSubstring("maintenance window"))))
		g.Expect(eventReasonsFor(g, getMesh().UID)).To(And(ContainElement("RolloutStarted"),
			Not(ContainElement("NodeWaveStarted")), Not(ContainElement("WaveStarted"))))
	})

	t.Run("without windows the rollout completes", func(t *testing.T) {
		g := NewWithT(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Upgrade.Windows = nil })
		g.Eventually(lastHistory).Should(And(HaveField("Version", "1.27.3"), HaveField("Outcome", meshv1.OutcomeSucceeded)))
		g.Eventually(meshReady).ShouldNot(BeNil())
		g.Expect(getMesh().Status.Version.Installed).To(Equal("1.27.3"))
		for _, ns := range namespaces {
			g.Expect(labelsOf(ns)).To(HaveKeyWithValue(meshv1.LabelRevision, "1-27-3"), ns)
		}
		g.Expect(releaseNames(g)).NotTo(ContainElement("istiod-1-26-4"))
	})
}

// dumpMeshOnFailure logs mesh/default's status when the test failed, before
// the Mesh is deleted.
func dumpMeshOnFailure(t *testing.T) {
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		if m := getMesh(); m != nil {
			out, _ := yaml.Marshal(m.Status)
			t.Logf("mesh/default generation %d status:\n%s", m.Generation, out)
		}
	})
}

// outcomes renders history entries as "<version> <outcome>".
func outcomes(h []meshv1.HistoryEntry) []string {
	out := make([]string, 0, len(h))
	for _, e := range h {
		out = append(out, e.Version+" "+string(e.Outcome))
	}
	return out
}

// eventReasonsFor lists the reasons of the events recorded for the Mesh with
// this UID (earlier tests' meshes were also called default).
func eventReasonsFor(g Gomega, uid types.UID) []string {
	var events eventsv1.EventList
	g.Expect(k8s.List(context.Background(), &events)).To(Succeed())
	var reasons []string
	for _, e := range events.Items {
		if e.Regarding.Kind == "Mesh" && e.Regarding.UID == uid {
			reasons = append(reasons, e.Reason)
		}
	}
	return reasons
}

func componentsByName(m *meshv1.Mesh) map[string]meshv1.ComponentStatus {
	out := map[string]meshv1.ComponentStatus{}
	if m != nil {
		for _, c := range m.Status.Components {
			out[c.Name] = c
		}
	}
	return out
}

// meshRecorder keeps every version of mesh/default that the API server
// sends on a watch, so a test can check states that last milliseconds.
type meshRecorder struct {
	mu     sync.Mutex
	seen   []meshv1.Mesh
	cancel context.CancelFunc
	done   chan struct{}
}

// recordMesh starts watching mesh/default; stop (or the test's end) ends it.
func recordMesh(t *testing.T) *meshRecorder {
	t.Helper()
	wc, err := client.NewWithWatch(kc.Config, client.Options{Scheme: kc.Scheme})
	if err != nil {
		t.Fatalf("watch client: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &meshRecorder{cancel: cancel, done: make(chan struct{})}
	started := make(chan struct{})
	go func() {
		defer close(r.done)
		rv := ""
		for first := true; ctx.Err() == nil; first = false {
			w, err := wc.Watch(ctx, &meshv1.MeshList{}, &client.ListOptions{
				FieldSelector: fields.OneTermEqualSelector("metadata.name", "default"),
				Raw:           &metav1.ListOptions{ResourceVersion: rv, AllowWatchBookmarks: true},
			})
			if first {
				close(started)
			}
			if err != nil {
				select {
				case <-ctx.Done():
				case <-time.After(200 * time.Millisecond):
				}
				continue
			}
			for ev := range w.ResultChan() {
				if ev.Type == watch.Error {
					rv = "" // too old: start over from the current state
					break
				}
				m, ok := ev.Object.(*meshv1.Mesh)
				if !ok {
					continue
				}
				rv = m.ResourceVersion
				if ev.Type == watch.Added || ev.Type == watch.Modified {
					r.mu.Lock()
					r.seen = append(r.seen, *m.DeepCopy())
					r.mu.Unlock()
				}
			}
			w.Stop()
		}
	}()
	<-started
	t.Cleanup(func() { r.stop() })
	return r
}

// stop ends the watch and returns what it saw, oldest first.
func (r *meshRecorder) stop() []meshv1.Mesh {
	r.cancel()
	<-r.done
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.seen)
}
