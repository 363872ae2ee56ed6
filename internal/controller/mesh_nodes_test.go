package controller

import (
	"testing"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/kernel"
)

func TestDecideNode(t *testing.T) {
	node := func(k string) *corev1.Node {
		return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n"}, Status: corev1.NodeStatus{NodeInfo: corev1.NodeSystemInfo{KernelVersion: k}}}
	}
	report := func(eligible bool, reason string) *meshv1.MeshNode {
		return &meshv1.MeshNode{Status: meshv1.MeshNodeStatus{KernelRelease: "6.1.0", Eligible: eligible, Reason: reason}}
	}
	ebpf := meshv1.DataplaneSpec{}
	block := meshv1.DataplaneSpec{KernelFallback: meshv1.FallbackBlock}
	min := kernel.Version{Major: 5, Minor: 10}
	cases := []struct {
		name       string
		node       *corev1.Node
		report     *meshv1.MeshNode
		spec       meshv1.DataplaneSpec
		want       meshv1.NodeRedirection
		ineligible string
	}{
		{"new kernel, no report yet", node("6.1.0-28-amd64"), nil, ebpf, meshv1.NodeRedirectionEBPF, ""},
		{"minimum kernel", node("5.10.0"), nil, ebpf, meshv1.NodeRedirectionEBPF, ""},
		{"old kernel falls back", node("5.4.0-216-generic"), nil, ebpf, meshv1.NodeRedirectionIPTables, "kernel 5.4.0 < 5.10.0 required"},
		{"old kernel blocked", node("5.4.0"), nil, block, meshv1.NodeRedirectionBlocked, "kernel 5.4.0 < 5.10.0 required"},
		{"preflight failed", node("6.1.0"), report(false, "no BTF"), ebpf, meshv1.NodeRedirectionIPTables, "preflight: no BTF"},
		{"preflight passed", node("6.1.0"), report(true, ""), ebpf, meshv1.NodeRedirectionEBPF, ""},
		{"unknown kernel string", node(""), nil, ebpf, meshv1.NodeRedirectionIPTables, "not understood"},
		{"iptables everywhere", node("5.4.0"), nil, meshv1.DataplaneSpec{Redirection: meshv1.RedirectionIPTables}, meshv1.NodeRedirectionIPTables, ""},
		{"sidecar sets no label", node("6.1.0"), nil, meshv1.DataplaneSpec{Mode: meshv1.ModeSidecar}, "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			d := decideNode(tc.node, tc.report, tc.spec, min)
			g.Expect(d.redirection).To(Equal(tc.want))
			if tc.ineligible == "" {
				g.Expect(d.ineligible).To(BeEmpty())
			} else {
				g.Expect(d.ineligible).To(ContainSubstring(tc.ineligible))
			}
		})
	}
}

func TestSummarizeNodes(t *testing.T) {
	g := NewWithT(t)
	c, failing := summarizeNodes([]nodeDecision{
		{name: "a", redirection: meshv1.NodeRedirectionEBPF},
		{name: "b", redirection: meshv1.NodeRedirectionEBPF},
		{name: "c", redirection: meshv1.NodeRedirectionIPTables, ineligible: "kernel 5.4.0 < 5.10.0 required"},
		{name: "d", redirection: meshv1.NodeRedirectionBlocked, ineligible: "preflight: no BTF"},
	})
	g.Expect(c).To(Equal(meshv1.NodeCounts{Total: 4, Eligible: 2, Fallback: 1, Blocked: 1}))
	g.Expect(failing).To(Equal([]string{"c: kernel 5.4.0 < 5.10.0 required (iptables)", "d: preflight: no BTF (blocked)"}))
	g.Expect(preflightMessage(failing)).To(ContainSubstring("2 node(s) cannot run eBPF redirection: c: kernel 5.4.0"))
}
