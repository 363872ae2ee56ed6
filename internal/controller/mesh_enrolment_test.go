package controller

import (
	"context"
	"fmt"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

func TestPodsNotEnrolled(t *testing.T) {
	now := time.Date(2026, 12, 1, 23, 0, 0, 0, time.UTC)
	const grace = 30 * time.Second
	pod := func(name string, waited time.Duration) meshv1.PodNotEnrolled {
		return meshv1.PodNotEnrolled{Namespace: "shop", Name: name, Since: metav1.NewTime(now.Add(-waited))}
	}
	enrolment := func(wanted, enrolled int32, omitted int32, pods ...meshv1.PodNotEnrolled) *meshv1.NodeEnrolment {
		return &meshv1.NodeEnrolment{Wanted: wanted, Enrolled: enrolled, NotEnrolled: pods, NotEnrolledOmitted: omitted}
	}
	withReason := func(p meshv1.PodNotEnrolled, reason string) meshv1.PodNotEnrolled {
		p.Reason = reason
		return p
	}
	var many []meshv1.PodNotEnrolled
	for i := range meshv1.MaxNotEnrolledPods {
		many = append(many, pod(fmt.Sprintf("web-%02d", i), time.Hour-time.Duration(i)*time.Second))
	}
	for _, tc := range []struct {
		name        string
		nodes       []nodeEnrolment
		wantOverdue []string
		wantRecheck time.Duration
	}{
		{"no report yet", []nodeEnrolment{{node: "node-a"}}, nil, 0},
		{"everything enrolled", []nodeEnrolment{{node: "node-a", report: enrolment(3, 3, 0)}}, nil, 0},
		{"a new pod within its grace period: look again when it ends",
			[]nodeEnrolment{{node: "node-a", report: enrolment(3, 2, 0, pod("web-1", 10*time.Second))}}, nil, 20 * time.Second},
		{"past the grace period, on two nodes", []nodeEnrolment{
			{node: "node-b", report: enrolment(2, 1, 0, pod("api-1", 2*time.Minute))},
			{node: "node-a", report: enrolment(4, 2, 0, pod("web-1", 45*time.Second), pod("web-2", 5*time.Second))},
		}, []string{
			"node-a: 2 of 4 wanted pods not enrolled: shop/web-1 (for 45s)",
			"node-b: 1 of 2 wanted pods not enrolled: shop/api-1 (for 2m0s)",
		}, 25 * time.Second},
		{"exactly at the grace period", []nodeEnrolment{{node: "node-a", report: enrolment(1, 0, 0, pod("web-1", grace))}},
			[]string{"node-a: 1 of 1 wanted pods not enrolled: shop/web-1 (for 30s)"}, 0},
		{"the agent's reason: ztunnel refused the pod, or none is connected", []nodeEnrolment{{node: "node-a", report: enrolment(3, 1, 0,
			withReason(pod("web-1", time.Minute), "ztunnel refused: failed to get a workload certificate"),
			withReason(pod("web-2", 40*time.Second), "no ztunnel connected"))}},
			[]string{"node-a: 2 of 3 wanted pods not enrolled: shop/web-1 (for 1m0s: ztunnel refused: failed to get a workload certificate), " +
				"shop/web-2 (for 40s: no ztunnel connected)"}, 0},
		{"many: five named, the others counted, with the ones the agent left out",
			[]nodeEnrolment{{node: "node-a", report: enrolment(50, 20, 10, many...)}},
			[]string{"node-a: 30 of 50 wanted pods not enrolled: shop/web-00 (for 1h0m0s), shop/web-01 (for 59m59s), shop/web-02 (for 59m58s), " +
				"shop/web-03 (for 59m57s), shop/web-04 (for 59m56s) and 25 more"}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			overdue, recheck := podsNotEnrolled(tc.nodes, now, grace)
			g.Expect(overdue).To(Equal(tc.wantOverdue))
			g.Expect(recheck).To(Equal(tc.wantRecheck))
		})
	}
}

func TestApplyStatusPodsNotEnrolled(t *testing.T) {
	g := NewWithT(t)
	mesh := &meshv1.Mesh{ObjectMeta: metav1.ObjectMeta{Generation: 2}}
	obs := done(observation{namespaces: 1, conflicts: []string{"b: x"},
		notEnrolled: []string{"node-a: 1 of 1 wanted pods not enrolled: shop/web-1 (for 45s)"}, notEnrolledGrace: 30 * time.Second})
	applyStatus(mesh, &obs, nil)
	c := meta.FindStatusCondition(mesh.Status.Conditions, meshv1.ConditionDegraded)
	g.Expect(c).NotTo(BeNil())
	g.Expect(c.Status).To(Equal(metav1.ConditionTrue))
	g.Expect(c.Reason).To(Equal(meshv1.ReasonPodsNotEnrolled), "traffic bypassing the mesh comes before a label conflict")
	g.Expect(c.Message).To(ContainSubstring("not enrolled after 30s, so their traffic bypasses the mesh: node-a: 1 of 1 wanted pods not enrolled: shop/web-1 (for 45s)"))
	g.Expect(readyStatus(mesh)).To(Equal("True"), "the rest of the mesh works: Ready stays, Degraded says what does not")

	recovered := done(observation{namespaces: 1})
	applyStatus(mesh, &recovered, nil)
	g.Expect(meta.FindStatusCondition(mesh.Status.Conditions, meshv1.ConditionDegraded)).To(BeNil())

	deleting := observation{deleting: true, notEnrolled: obs.notEnrolled}
	applyStatus(mesh, &deleting, nil)
	g.Expect(meta.FindStatusCondition(mesh.Status.Conditions, meshv1.ConditionDegraded)).To(BeNil(), "not while deleting")
}

// TestMeshDegradedWhilePodsAreNotEnrolled: node agents report their
// enrolment on their MeshNodes (written here as the agents write them, to the
// status subresource of the real API server); the Mesh goes Degraded
// PodsNotEnrolled, naming the node and the pods, once a pod has waited past
// the grace period, also when no MeshNode changes meanwhile, and recovers
// when the agent reports the pod enrolled.
func TestMeshDegradedWhilePodsAreNotEnrolled(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	mkNS(g, "ne-a", map[string]string{"ne-mesh": "on"})
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.28.2",
			Dataplane:  meshv1.DataplaneSpec{Mode: meshv1.ModeAmbient, Redirection: meshv1.RedirectionEBPF},
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"ne-mesh": "on"}}},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)
	g.Eventually(meshReady).ShouldNot(BeNil())

	// node-new and node-mid run eBPF redirection (node-old's kernel is too
	// old); their agents' reports:
	writeMeshNode(t, "node-mid", "5.15.0-130-generic", &meshv1.NodeEnrolment{Wanted: 2, Enrolled: 2})
	report := func(pods ...meshv1.PodNotEnrolled) {
		writeMeshNode(t, "node-new", "6.1.0-28-amd64", &meshv1.NodeEnrolment{
			Wanted: int32(2 + len(pods)), Enrolled: 2, NotEnrolled: pods})
	}
	degraded := func() *metav1.Condition {
		return meta.FindStatusCondition(getMesh().Status.Conditions, meshv1.ConditionDegraded)
	}

	t.Run("a pod waiting past the grace period degrades the Mesh, naming node and pod", func(t *testing.T) {
		g := NewWithT(t)
		report(meshv1.PodNotEnrolled{Namespace: "ne-a", Name: "web-1", Since: metav1.NewTime(time.Now().Add(-time.Minute)),
			Reason: "ztunnel refused: failed to get a workload certificate"})
		g.Eventually(degraded).Should(And(Not(BeNil()),
			HaveField("Status", metav1.ConditionTrue),
			HaveField("Reason", meshv1.ReasonPodsNotEnrolled),
			HaveField("Message", ContainSubstring("node-new: 1 of 3 wanted pods not enrolled: ne-a/web-1 (for 1m")),
			HaveField("Message", ContainSubstring(": ztunnel refused: failed to get a workload certificate)")),
			HaveField("Message", Not(ContainSubstring("node-mid")))))
	})

	t.Run("the agent enrols it: the Mesh recovers", func(t *testing.T) {
		g := NewWithT(t)
		report()
		g.Eventually(degraded).Should(BeNil())
		g.Expect(readyStatus(getMesh())).To(Equal("True"))
	})

	t.Run("a new pod is given its grace period, then degrades the Mesh without another report", func(t *testing.T) {
		g := NewWithT(t)
		since := time.Now().Add(-DefaultNotEnrolledGrace + 4*time.Second)
		report(meshv1.PodNotEnrolled{Namespace: "ne-a", Name: "web-2", Since: metav1.NewTime(since)})
		g.Consistently(degraded).WithTimeout(2*time.Second).Should(BeNil(), "within its grace period")
		g.Eventually(degraded).WithTimeout(20 * time.Second).Should(HaveField("Message", ContainSubstring("ne-a/web-2")))
		t.Logf("Degraded %s after the pod was first wanted (grace %s)", time.Since(since).Round(100*time.Millisecond), DefaultNotEnrolledGrace)
		report()
		g.Eventually(degraded).Should(BeNil())
	})
}

// writeMeshNode writes a MeshNode's status as its node agent does, and
// deletes the MeshNode when the test ends.
func writeMeshNode(t *testing.T, node, kernel string, enrolment *meshv1.NodeEnrolment) {
	t.Helper()
	g := NewWithT(t)
	ctx := context.Background()
	mn := &meshv1.MeshNode{}
	err := k8s.Get(ctx, client.ObjectKey{Name: node}, mn)
	if apierrors.IsNotFound(err) {
		mn = &meshv1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: node}}
		g.Expect(k8s.Create(ctx, mn)).To(Succeed())
		t.Cleanup(func() { _ = k8s.Delete(context.Background(), mn) })
	} else {
		g.Expect(err).NotTo(HaveOccurred())
	}
	now := metav1.Now()
	enrolment.ObservedAt = &now
	mn.Status = meshv1.MeshNodeStatus{KernelRelease: kernel, BTF: true, CgroupV2: true, BPFFS: true, Eligible: true,
		Redirection: meshv1.NodeRedirectionEBPF, ProbedAt: &now, Enrolment: enrolment}
	g.Expect(k8s.Status().Update(ctx, mn)).To(Succeed())
}
