package spire

import (
	"encoding/json"
	"net"
	"net/http"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// StartKubeletPodsStandIn serves a kubelet's read-only /pods endpoint on
// 127.0.0.1 for spire-agent's k8s workload attestor: a TEST DOUBLE of the
// kubelet's pod list, because the host has no kubelet (real kubelet nodes
// are another branch's work). pods is called per request; the pods it
// returns are what the kubelet would report for its node, container IDs
// included. It returns the port.
func StartKubeletPodsStandIn(t testing.TB, pods func() []corev1.Pod) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /pods", func(w http.ResponseWriter, _ *http.Request) {
		list := corev1.PodList{Items: pods()}
		list.Kind, list.APIVersion = "PodList", "v1"
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(&list)
	})
	srv := &http.Server{Handler: mux}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return l.Addr().(*net.TCPAddr).Port
}
