package controller

import (
	"context"
	"encoding/json"
	"sync/atomic"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/plan"
)

// TestEngineMemoryRoundTrip: what the engine remembers comes back from
// status.rollout.engine exactly (times to the microsecond status keeps),
// so an operator restarted at any step decides from the same memory.
func TestEngineMemoryRoundTrip(t *testing.T) {
	g := NewWithT(t)
	at := time.Date(2026, 12, 2, 10, 0, 0, 123456000, time.UTC)
	m := &plan.Memory{
		Base:   plan.Installed{Version: "1.28.2", Mode: meshv1.ModeAmbient, Redirection: meshv1.RedirectionEBPF},
		Want:   plan.Installed{Version: "1.28.2", Mode: meshv1.ModeSidecar},
		Target: "1.28.2", SpecVersion: "1.28",
		Steps: []plan.Step{
			{Action: plan.ActionConfigureControlPlane, Target: "1.28.2", Version: "1.28.2", From: "1.28.2", Revision: "1-28-2", Components: []bundle.Component{bundle.Istiod}, Windowed: true, Message: "serve both"},
			{Action: plan.ActionMoveNamespaces, Target: "1.28.2 Sidecar", Version: "1.28.2", From: "1.28.2", Revision: "1-28-2"},
		},
		Step: 1, Wave: 2, Phase: plan.PhaseBaking,
		NamespaceWave: map[string]int{"canary": 1, "a": 2, "b": 2, "c": 3}, NamespaceWaves: 4,
		NodeWave: map[string]int{"n1": 1}, NodeWaves: 1, Joined: map[string]bool{"n1": true},
		StartedAt: at.Truncate(time.Second), PhaseAt: at, NextCheckAt: at.Add(time.Minute),
		FailedChecks: 1, InconclusiveChecks: 2, Degraded: true, Reason: "why", Restart: "2026-12-02T10:00:00Z",
	}
	got, err := memoryFromStatus(&meshv1.RolloutStatus{Engine: memoryToStatus(m)})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(got).To(Equal(m))
	g.Expect(memoryToStatus(m).NamespaceWaves).To(Equal([]meshv1.EngineWave{
		{Names: []string{"canary"}}, {Names: []string{"a", "b"}}, {Names: []string{"c"}}, {}}), "an emptied wave keeps its place")

	_, err = memoryFromStatus(&meshv1.RolloutStatus{Engine: &meshv1.EngineMemory{Step: 3}})
	g.Expect(err).To(MatchError(ContainSubstring("step 3 of 0 steps")))
	none, err := memoryFromStatus(&meshv1.RolloutStatus{Step: meshv1.RolloutStepNamespaces})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(none).To(BeNil(), "a rollout of the step machine is not the engine's")
}

// TestPlacementLabels: a namespace's placement and its labels are one.
func TestPlacementLabels(t *testing.T) {
	g := NewWithT(t)
	for _, p := range []plan.Placement{
		{Revision: "1-28-2", Mode: meshv1.ModeAmbient},
		{Revision: "1-28-2", Mode: meshv1.ModeSidecar},
		{},
	} {
		ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "x", Labels: placementLabels(p)}}
		ns.ManagedFields = labelsOwnedBy(meshv1.FieldManager, placementLabels(p))
		g.Expect(placementOf(ns)).To(Equal(p), p.String())
	}
	foreign := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "x", Labels: map[string]string{meshv1.LabelRevision: "1-27-3"},
		ManagedFields: labelsOwnedBy("someone-else", map[string]string{meshv1.LabelRevision: "1-27-3"})}}
	g.Expect(placementOf(foreign)).To(Equal(plan.Placement{}), "a label someone else owns does not place the namespace")
}

// labelsOwnedBy is a server-side apply managed-fields entry of manager owning labels.
func labelsOwnedBy(manager string, labels map[string]string) []metav1.ManagedFieldsEntry {
	if len(labels) == 0 {
		return nil
	}
	raw := map[string]any{}
	for k := range labels {
		raw["f:"+k] = map[string]any{}
	}
	b, _ := json.Marshal(map[string]any{"f:metadata": map[string]any{"f:labels": raw}})
	return []metav1.ManagedFieldsEntry{{Manager: manager, Operation: metav1.ManagedFieldsOperationApply, FieldsV1: &metav1.FieldsV1{Raw: b}}}
}

// TestNodeRedirectionAt: a node has moved to its label's redirection only
// once the component that redirects there is ready and the other one has
// gone from the node (a stopping node agent is still removing its datapath).
func TestNodeRedirectionAt(t *testing.T) {
	ready := podState{name: "p-ready", ready: true}
	unready := podState{name: "p-unready"}
	stopping := podState{name: "p-stopping", ready: true, terminating: true}
	for _, tc := range []struct {
		name, label string
		agent, cni  []podState
		want        meshv1.Redirection
		waiting     string
	}{
		{name: "ebpf settled", label: "ebpf", agent: []podState{ready}, want: meshv1.RedirectionEBPF},
		{name: "ebpf, agent not ready", label: "ebpf", agent: []podState{unready}, waiting: "no ready node-agent pod"},
		{name: "ebpf, no agent yet", label: "ebpf", waiting: "no ready node-agent pod"},
		{name: "ebpf, istio-cni still there", label: "ebpf", agent: []podState{ready}, cni: []podState{stopping}, waiting: "p-stopping still running"},
		{name: "iptables settled", label: "iptables", cni: []podState{ready}, want: meshv1.RedirectionIPTables},
		{name: "iptables, the agent cleaning up", label: "iptables", agent: []podState{stopping}, cni: []podState{ready}, waiting: "p-stopping still running"},
		{name: "iptables, only a stopping istio-cni", label: "iptables", cni: []podState{stopping}, waiting: "no ready istio-cni pod"},
		{name: "blocked, nothing runs", label: "blocked", want: meshv1.RedirectionEBPF},
		{name: "blocked, istio-cni still there", label: "blocked", cni: []podState{ready}, waiting: "p-ready still running"},
		{name: "not labelled", label: "", agent: []podState{ready}, waiting: "not labelled meshkeeper.dev/redirection yet"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, waiting := nodeRedirectionAt(tc.label, tc.agent, tc.cni)
			if got != tc.want || waiting != tc.waiting {
				t.Errorf("nodeRedirectionAt(%q) = %q, %q; want %q, %q", tc.label, got, waiting, tc.want, tc.waiting)
			}
		})
	}
}

// TestNodeRedirections: only the nodes a decision moves get a new label; a
// move without a redirection (node components removed) relabels nothing.
func TestNodeRedirections(t *testing.T) {
	g := NewWithT(t)
	d := plan.Decision{Nodes: map[string]plan.NodePlacement{
		"a": {Version: "1.28.2", Redirection: meshv1.RedirectionIPTables},
		"b": {},
	}}
	g.Expect(nodeRedirections(d)).To(Equal(map[string]meshv1.Redirection{"a": meshv1.RedirectionIPTables}))
	g.Expect(nodeRedirections(plan.Decision{})).To(BeEmpty())
	g.Expect(nodeRedirections(plan.Decision{})).NotTo(BeNil(), "non-nil: nodes not moved keep their labels")
}

// TestObserveRestartReadsARolledOutNamespaceOnce: a wave's namespaces are
// observed every reconcile while the wave moves, four uncached LISTs each;
// one seen rolled out with the wave's token is not read again, and a new
// token (the next wave, a rollback) reads it afresh.
func TestObserveRestartReadsARolledOutNamespaceOnce(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	mkNS(g, "obs-empty", nil) // no workloads: rolled out with any token
	var lists atomic.Int64
	ww, err := client.NewWithWatch(kc.Config, client.Options{Scheme: kc.Scheme})
	g.Expect(err).NotTo(HaveOccurred())
	r := &MeshReconciler{Client: k8s, Workloads: interceptor.NewClient(ww, interceptor.Funcs{
		List: func(ctx context.Context, c client.WithWatch, list client.ObjectList, opts ...client.ListOption) error {
			lists.Add(1)
			return c.List(ctx, list, opts...)
		},
	})}
	observe := func(token string) int64 {
		before := lists.Load()
		done, waiting, err := r.observeRestart(ctx, "obs-empty", token)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(done).To(BeTrue(), waiting)
		return lists.Load() - before
	}
	g.Expect(observe("2026-12-03T17:00:00Z")).To(BeEquivalentTo(4), "deployments, statefulsets, daemonsets, PDBs")
	g.Expect(observe("2026-12-03T17:00:00Z")).To(BeZero(), "seen rolled out with this token: not read again")
	g.Expect(observe("rollback-2026-12-03T17:05:00Z")).To(BeEquivalentTo(4), "a new token is observed afresh")
}
