package controller

import (
	"testing"

	. "github.com/onsi/gomega"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// TestMeshWidePeerAuthenticationShape pins the object test/istiod has a
// real istiod accept: security.istio.io/v1 PeerAuthentication
// istio-system/meshkeeper-mesh-mtls, spec.mtls.mode STRICT, no selector.
func TestMeshWidePeerAuthenticationShape(t *testing.T) {
	g := NewWithT(t)
	pa := MeshWidePeerAuthentication("istio-system")
	g.Expect(pa.Object).To(Equal(map[string]any{
		"apiVersion": "security.istio.io/v1",
		"kind":       "PeerAuthentication",
		"metadata": map[string]any{
			"name":      "meshkeeper-mesh-mtls",
			"namespace": "istio-system",
			"labels": map[string]any{
				"meshkeeper.dev/component":     "mtls",
				"app.kubernetes.io/managed-by": "meshkeeper",
			},
		},
		"spec": map[string]any{"mtls": map[string]any{"mode": "STRICT"}},
	}))
	g.Expect(ownPeerAuthentication(pa)).To(BeTrue())
	g.Expect(meshWide(pa)).To(BeTrue())
}

func peerAuthentication(ns, name string, spec map[string]any, labels map[string]string) *unstructured.Unstructured {
	pa := &unstructured.Unstructured{Object: map[string]any{"spec": spec}}
	pa.SetGroupVersionKind(peerAuthenticationGVK)
	pa.SetNamespace(ns)
	pa.SetName(name)
	pa.SetLabels(labels)
	return pa
}

func TestPeerAuthenticationReading(t *testing.T) {
	g := NewWithT(t)
	selector := map[string]any{"matchLabels": map[string]any{"app": "db"}}
	for _, tc := range []struct {
		name     string
		pa       *unstructured.Unstructured
		meshWide bool
		own      bool
		optOut   string
	}{
		{"namespace-wide opt-out", peerAuthentication("shop", "legacy", map[string]any{"mtls": map[string]any{"mode": "PERMISSIVE"}}, nil),
			true, false, "shop/legacy: PERMISSIVE"},
		{"workload opt-out with ports", peerAuthentication("shop", "db", map[string]any{"selector": selector,
			"mtls": map[string]any{"mode": "DISABLE"}, "portLevelMtls": map[string]any{"5432": map[string]any{"mode": "DISABLE"}}}, nil),
			false, false, "shop/db: DISABLE (workload selector; port-level modes)"},
		{"no mode is UNSET", peerAuthentication("shop", "inherit", map[string]any{}, nil), true, false, "shop/inherit: UNSET"},
		{"empty selector is no selector", peerAuthentication("istio-system", "x", map[string]any{"selector": map[string]any{}}, nil), true, false, "istio-system/x: UNSET"},
		{"meshkeeper's name without its label is not its own",
			peerAuthentication("istio-system", mtlsPeerAuthenticationName, map[string]any{}, map[string]string{"team": "sec"}), true, false, "istio-system/meshkeeper-mesh-mtls: UNSET"},
		{"its label on another name is not its own",
			peerAuthentication("istio-system", "default", map[string]any{}, map[string]string{meshv1.LabelComponent: componentMTLS}), true, false, "istio-system/default: UNSET"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			g.Expect(meshWide(tc.pa)).To(Equal(tc.meshWide))
			g.Expect(ownPeerAuthentication(tc.pa)).To(Equal(tc.own))
			g.Expect(describeOptOut(tc.pa)).To(Equal(tc.optOut))
		})
	}
	g.Expect(ownPeerAuthentication(MeshWidePeerAuthentication("istio-system"))).To(BeTrue())
}

// TestDecideMTLS is the table of when meshkeeper's STRICT policy is
// written, kept, removed or left absent.
func TestDecideMTLS(t *testing.T) {
	namespaces := &meshv1.RolloutStatus{Step: meshv1.RolloutStepNamespaces, From: "1.27.3", To: "1.28.2", Wave: 1, Waves: 2}
	retire := &meshv1.RolloutStatus{Step: meshv1.RolloutStepRetire, From: "1.27.3", To: "1.28.2"}
	back := &meshv1.RolloutStatus{Step: meshv1.RolloutStepRollingBack, From: "1.27.3", To: "1.28.2"}
	for _, tc := range []struct {
		name   string
		facts  mtlsFacts
		action mtlsAction
		msg    string // substring; "" means no message
	}{
		{"permissive removes it", mtlsFacts{want: meshv1.MTLSPermissive, own: true, converged: true}, mtlsRemove, ""},
		{"fresh install, not yet Ready: not yet", mtlsFacts{want: meshv1.MTLSStrict}, mtlsLeave, "once the mesh is Ready"},
		{"fresh install Ready: written", mtlsFacts{want: meshv1.MTLSStrict, converged: true}, mtlsApply, ""},
		{"written, a component recovering: kept", mtlsFacts{want: meshv1.MTLSStrict, own: true}, mtlsApply, ""},
		{"a namespace wave runs: removed", mtlsFacts{want: meshv1.MTLSStrict, own: true, rollout: namespaces}, mtlsRemove, "while the rollout to 1.28.2 runs"},
		{"every wave passed, old revision not yet retired: still held", mtlsFacts{want: meshv1.MTLSStrict, rollout: retire}, mtlsRemove, "applied again once the rollout has ended"},
		{"rolling back: removed", mtlsFacts{want: meshv1.MTLSStrict, own: true, rollout: back}, mtlsRemove, "rolling 1.28.2 back to 1.27.3"},
		{"rollout ended: written", mtlsFacts{want: meshv1.MTLSStrict, converged: true}, mtlsApply, ""},
		{"its name taken: left", mtlsFacts{want: meshv1.MTLSStrict, converged: true, nameTaken: true}, mtlsLeave, "did not write is in the way"},
		{"a foreign mesh-wide one: none of its own added", mtlsFacts{want: meshv1.MTLSStrict, converged: true, foreign: []string{"istio-system/default"}}, mtlsLeave, "istio-system/default is a mesh-wide PeerAuthentication meshkeeper did not write"},
		{"a foreign mesh-wide one after its own: its own kept", mtlsFacts{want: meshv1.MTLSStrict, converged: true, own: true, foreign: []string{"istio-system/default"}}, mtlsApply, ""},
		{"a foreign one does not keep STRICT in a rollout", mtlsFacts{want: meshv1.MTLSStrict, own: true, rollout: namespaces, foreign: []string{"istio-system/default"}}, mtlsRemove, "held back"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			action, msg := decideMTLS(tc.facts)
			g.Expect(action).To(Equal(tc.action))
			if tc.msg == "" {
				g.Expect(msg).To(BeEmpty())
			} else {
				g.Expect(msg).To(ContainSubstring(tc.msg))
			}
		})
	}
}

// TestMTLSConflictIsDegraded: a foreign mesh-wide PeerAuthentication makes
// the Mesh Degraded with reason MTLSConflict, naming it, and its status
// lists are capped with a count.
func TestMTLSConflictIsDegraded(t *testing.T) {
	g := NewWithT(t)
	mesh := &meshv1.Mesh{}
	obs := &observation{namespacesObserved: true, mtls: mtlsObservation{observed: true, strict: true, status: meshv1.SecurityStatus{
		MTLS: meshv1.MTLSPermissive, Conflicts: []string{"istio-system/default: mesh-wide PERMISSIVE, not written by meshkeeper, left as it is"},
		OptOuts: names("shop/legacy: PERMISSIVE", maxMTLSOptOuts+3),
	}}}
	applyStatus(mesh, obs, nil)
	cond := meta.FindStatusCondition(mesh.Status.Conditions, meshv1.ConditionDegraded)
	g.Expect(cond).NotTo(BeNil())
	g.Expect(cond.Reason).To(Equal(meshv1.ReasonMTLSConflict))
	g.Expect(cond.Message).To(ContainSubstring("istio-system/default: mesh-wide PERMISSIVE"))
	g.Expect(mesh.Status.Security.OptOuts).To(HaveLen(maxMTLSOptOuts))
	g.Expect(mesh.Status.Security.OptOutsOmitted).To(BeEquivalentTo(3))

	obs.mtls.status.Conflicts = nil
	applyStatus(mesh, obs, nil)
	g.Expect(meta.FindStatusCondition(mesh.Status.Conditions, meshv1.ConditionDegraded)).To(BeNil())
}
