package controller

import (
	"testing"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

func TestWaypointForLabel(t *testing.T) {
	g := NewWithT(t)
	g.Expect(waypointFor("")).To(Equal("service"), "Service is the default")
	g.Expect(waypointFor(meshv1.WaypointForService)).To(Equal("service"))
	g.Expect(waypointFor(meshv1.WaypointForWorkload)).To(Equal("workload"))
	g.Expect(waypointFor(meshv1.WaypointForAll)).To(Equal("all"))
}

func TestUsedWaypointsIsTheFirstListedPerNamespace(t *testing.T) {
	g := NewWithT(t)
	g.Expect(usedWaypoints([]meshv1.WaypointSpec{
		{Namespace: "shop", Name: "l7"}, {Namespace: "cart", Name: "waypoint"}, {Namespace: "shop", Name: "other"},
	})).To(Equal(map[string]string{"shop": "l7", "cart": "waypoint"}))
}

func TestUseWaypointOwnership(t *testing.T) {
	owned := func(manager string, op metav1.ManagedFieldsOperationType) metav1.ManagedFieldsEntry {
		return metav1.ManagedFieldsEntry{Manager: manager, Operation: op,
			FieldsV1: &metav1.FieldsV1{Raw: []byte(`{"f:metadata":{"f:labels":{"f:istio.io/use-waypoint":{}}}}`)}}
	}
	ns := func(value string, mf ...metav1.ManagedFieldsEntry) *corev1.Namespace {
		n := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", ManagedFields: mf}}
		if value != "" {
			n.Labels = map[string]string{meshv1.LabelUseWaypoint: value}
		}
		return n
	}
	for _, tc := range []struct {
		name           string
		ns             *corev1.Namespace
		owns, foreign  bool
		ownsAsWaypoint bool
	}{
		{"no label", ns(""), false, false, false},
		{"set by meshkeeper", ns("waypoint", owned(waypointFieldManager, metav1.ManagedFieldsOperationApply)), true, false, true},
		{"set by someone else", ns("theirs", owned("kubectl", metav1.ManagedFieldsOperationUpdate)), false, true, false},
		{"meshkeeper's namespace manager is not the waypoint one", ns("waypoint", owned(meshv1.FieldManager, metav1.ManagedFieldsOperationApply)), false, true, false},
		{"meshkeeper's, another value", ns("other", owned(waypointFieldManager, metav1.ManagedFieldsOperationApply)), true, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			g.Expect(ownsUseWaypoint(tc.ns, "")).To(Equal(tc.owns))
			g.Expect(foreignUseWaypoint(tc.ns)).To(Equal(tc.foreign))
			g.Expect(ownsUseWaypoint(tc.ns, "waypoint")).To(Equal(tc.ownsAsWaypoint))
		})
	}
}
