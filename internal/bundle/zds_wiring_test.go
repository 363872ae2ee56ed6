package bundle_test

import (
	"testing"

	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

func daemonSet(g Gomega, b *bundle.Bundle, c bundle.Component, in bundle.Inputs, name string) *appsv1.DaemonSet {
	o := render(g, b, c, in)["DaemonSet/"+name]
	g.Expect(o).NotTo(BeNil(), "%s renders DaemonSet %s", c, name)
	var ds appsv1.DaemonSet
	g.Expect(runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &ds)).To(Succeed())
	return &ds
}

// hostPathMount returns the host path mounted at mountPath in a container.
func hostPathMount(spec corev1.PodSpec, container, mountPath string) string {
	for _, c := range spec.Containers {
		if c.Name != container {
			continue
		}
		for _, m := range c.VolumeMounts {
			if m.MountPath != mountPath {
				continue
			}
			for _, v := range spec.Volumes {
				if v.Name == m.Name && v.HostPath != nil {
					return v.HostPath.Path
				}
			}
		}
	}
	return ""
}

// TestZtunnelAndTheNodeAgentShareTheZDSSocket: in every bundle, ztunnel
// looks for its ZDS peer at /var/run/ztunnel/ztunnel.sock, the node agent
// serves that socket in the same host directory and is ready only through
// /readyz (which waits for the socket to serve), ztunnel's readiness stays
// its own (:15021, ready once it got the agent's snapshot), and istio-cni,
// the other ZDS peer, runs only on iptables-fallback nodes.
func TestZtunnelAndTheNodeAgentShareTheZDSSocket(t *testing.T) {
	catalog := bundle.Default()
	for _, v := range catalog.Versions() {
		t.Run(v, func(t *testing.T) {
			g := NewWithT(t)
			b, err := catalog.Resolve(v)
			g.Expect(err).NotTo(HaveOccurred())
			in := bundle.Inputs{Mode: "Ambient", Redirection: "EBPF", Namespace: "istio-system"}

			zt := daemonSet(g, b, bundle.Ztunnel, in, "ztunnel").Spec.Template.Spec
			g.Expect(hostPathMount(zt, "istio-proxy", "/var/run/ztunnel")).To(Equal("/var/run/ztunnel"))
			probe := zt.Containers[0].ReadinessProbe
			g.Expect(probe).NotTo(BeNil())
			g.Expect(probe.HTTPGet.Path).To(Equal("/healthz/ready"))
			g.Expect(probe.HTTPGet.Port.IntValue()).To(Equal(15021))

			agent := daemonSet(g, b, bundle.NodeAgent, in, "meshkeeper-node-agent").Spec.Template.Spec
			g.Expect(hostPathMount(agent, "agent", "/var/run/ztunnel")).To(Equal("/var/run/ztunnel"), "the agent serves ZDS in ztunnel's socket directory")
			g.Expect(agent.Containers[0].Args).To(ContainElement("--zds-socket=/var/run/ztunnel/ztunnel.sock"))
			g.Expect(agent.Containers[0].ReadinessProbe.HTTPGet.Path).To(Equal("/readyz"))
			g.Expect(agent.NodeSelector).To(HaveKeyWithValue("meshkeeper.dev/redirection", "ebpf"))

			cni := daemonSet(g, b, bundle.CNI, bundle.Inputs{Mode: "Ambient", Redirection: "IPTables", Namespace: "istio-system"}, "istio-cni-node").Spec.Template.Spec
			g.Expect(cni.NodeSelector).To(HaveKeyWithValue("meshkeeper.dev/redirection", "iptables"), "istio-cni only on iptables-fallback nodes")

			// The cleanup phase runs no agent, so it mounts no socket.
			in.NodeAgentCleanup = true
			clean := daemonSet(g, b, bundle.NodeAgent, in, "meshkeeper-node-agent").Spec.Template.Spec
			for _, vol := range clean.Volumes {
				g.Expect(vol.Name).NotTo(Equal("ztunnel-sock-dir"))
			}
		})
	}
}
