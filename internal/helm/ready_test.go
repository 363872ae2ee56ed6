package helm

import (
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// TestOnDeleteDaemonSetReady: an OnDelete DaemonSet whose pods still run an
// older template is ready once its pods are available (the caller moves
// them node by node); a RollingUpdate DaemonSet is left to kstatus.
func TestOnDeleteDaemonSetReady(t *testing.T) {
	ds := func(strategy string, generation, observed, desired, current, updated, available int64) *unstructured.Unstructured {
		u := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "apps/v1", "kind": "DaemonSet",
			"metadata": map[string]any{"name": "ztunnel", "generation": generation},
			"spec":     map[string]any{"updateStrategy": map[string]any{"type": strategy}},
			"status": map[string]any{
				"observedGeneration": observed, "desiredNumberScheduled": desired, "currentNumberScheduled": current,
				"updatedNumberScheduled": updated, "numberAvailable": available, "numberReady": available,
			},
		}}
		return u
	}
	for _, tc := range []struct {
		name    string
		obj     *unstructured.Unstructured
		ok      bool
		handled bool
	}{
		{name: "old pods, all available: ready", obj: ds("OnDelete", 2, 2, 3, 3, 1, 3), ok: true, handled: true},
		{name: "a pod being replaced: not ready", obj: ds("OnDelete", 2, 2, 3, 3, 1, 2), handled: true},
		{name: "new template not seen yet: not ready", obj: ds("OnDelete", 3, 2, 3, 3, 3, 3), handled: true},
		{name: "a node without its pod: not ready", obj: ds("OnDelete", 2, 2, 3, 2, 2, 3), handled: true},
		{name: "RollingUpdate is kstatus's", obj: ds("RollingUpdate", 2, 2, 3, 3, 1, 3)},
		{name: "other kinds are kstatus's", obj: &unstructured.Unstructured{Object: map[string]any{"apiVersion": "apps/v1", "kind": "Deployment"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ok, msg, handled := onDeleteDaemonSetReady(tc.obj)
			if ok != tc.ok || handled != tc.handled {
				t.Errorf("got ready=%v handled=%v (%q), want ready=%v handled=%v", ok, handled, msg, tc.ok, tc.handled)
			}
			if handled && !ok && msg == "" {
				t.Error("a DaemonSet that is not ready must say why")
			}
		})
	}
}
