package controller

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/identity"
	"github.com/meshkeeper/meshkeeper/test/spire"
)

// attestAgentOn starts a real spire-agent that attests to s as the node's
// agent, the way the spire-agent DaemonSet's pod there does: k8s_psat with a
// projected token of the spire-agent service account bound to the chart's
// spire-agent pod on that node. The real server validates the token
// (TokenReview) and reads the node from the pod, which gives the agent the
// selector k8s_psat:agent_node_name:<node> the node-wave gate reads.
func attestAgentOn(t *testing.T, s *spire.Server, node string) {
	t.Helper()
	g := NewWithT(t)
	ctx := context.Background()
	var agentPod corev1.Pod
	g.Eventually(func() error {
		var pods corev1.PodList
		if err := k8s.List(ctx, &pods, client.InNamespace(componentsNamespace), client.MatchingLabels{"app": "spire-agent"}); err != nil {
			return err
		}
		for _, p := range pods.Items {
			if p.Spec.NodeName == node && p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning {
				agentPod = p
				return nil
			}
		}
		return fmt.Errorf("no running spire-agent pod on %s", node)
	}).WithTimeout(slow).Should(Succeed())
	cs, err := kubernetes.NewForConfig(kc.Config)
	g.Expect(err).NotTo(HaveOccurred())
	tr, err := cs.CoreV1().ServiceAccounts(componentsNamespace).CreateToken(ctx, "spire-agent", &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			Audiences:         []string{"spire-server"},
			ExpirationSeconds: ptr(int64(3600)),
			BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: agentPod.Name, UID: agentPod.UID},
		},
	}, metav1.CreateOptions{})
	g.Expect(err).NotTo(HaveOccurred())
	tokenFile := filepath.Join(spire.ShortTempDir(t, "mkn"), "token")
	g.Expect(os.WriteFile(tokenFile, []byte(tr.Status.Token), 0o600)).To(Succeed())
	spire.StartAgent(t, s, spire.AgentOptions{PSATTokenFile: tokenFile})
}

// attestedNodes lists the nodes the real server has attested agents for, as
// the controller reads them (identity.Agent.NodeName).
func attestedNodes(g Gomega, s *spire.Server) []string {
	srv, err := identity.Dial("unix://"+s.Socket, nil)
	g.Expect(err).NotTo(HaveOccurred())
	defer srv.Close()
	agents, err := srv.ListAgents(context.Background())
	g.Expect(err).NotTo(HaveOccurred())
	var out []string
	for _, a := range agents {
		out = append(out, a.NodeName())
	}
	slices.Sort(out)
	return out
}

// TestNodeWaveWaitsForSpireAgents: during a version upgrade with node waves,
// a wave whose node has no attested SPIRE agent holds after its pods moved,
// saying which node it waits for, and moves on once a real spire-agent
// attests there. The SPIRE server and agents are the real v1.13.3 binaries;
// agents attest with k8s_psat against the suite's API server. The cluster's
// nodes: node-new (pool: canary), node-mid, node-old.
func TestNodeWaveWaitsForSpireAgents(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	s := spire.StartServer(t, spire.ServerOptions{
		Kubeconfig:         kc.KubeconfigPath,
		PSATServiceAccount: componentsNamespace + ":spire-agent",
	})
	testSpire.set(s.Socket)
	t.Cleanup(func() { testSpire.set("") })

	mkNS(g, "aw-a", map[string]string{"aw-mesh": "on"})
	one := intstr.FromInt32(1)
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.26",
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"aw-mesh": "on"}}},
			Identity:   meshv1.IdentitySpec{Spire: &meshv1.SpireSpec{Enabled: true, TrustDomain: "example.org"}},
			Rollout: meshv1.RolloutSpec{
				Nodes: meshv1.NodeRolloutSpec{
					Canary:         &metav1.LabelSelector{MatchLabels: map[string]string{"pool": "canary"}},
					MaxUnavailable: &one,
					Bake:           &metav1.Duration{Duration: time.Second},
				},
				Namespaces:  meshv1.NamespaceRolloutSpec{Bake: &metav1.Duration{}},
				RetireAfter: &metav1.Duration{},
			},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)

	// The agents of node-new and node-old attest; node-mid's does not yet.
	g.Eventually(identityStatus).WithTimeout(slow).Should(And(Not(BeNil()), HaveField("Registration", meshv1.RegistrationActive)))
	attestAgentOn(t, s, "node-new")
	attestAgentOn(t, s, "node-old")
	g.Expect(attestedNodes(g, s)).To(Equal([]string{"node-new", "node-old"}))
	g.Eventually(identityStatus).Should(HaveField("AgentsAttested", "2/3"))
	g.Eventually(meshReady).WithTimeout(slow).ShouldNot(BeNil())

	updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Version = "1.27" })

	t.Run("the wave of a node without an attested agent holds, naming the node", func(t *testing.T) {
		g := NewWithT(t)
		g.Eventually(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).WithTimeout(slow).Should(And(Not(BeNil()),
			HaveField("Step", meshv1.RolloutStepNodes), HaveField("Wave", int32(2)), HaveField("WaveNodes", []string{"node-mid"}),
			HaveField("Message", ContainSubstring("node wave 2/3 (node-mid): waiting for the SPIRE agent to attest on node-mid"))),
			"node wave 1 (node-new, attested) went through")
		g.Eventually(podRevisions).WithArguments("ztunnel").Should(HaveKeyWithValue("node-mid", "1-27-3"), "its pods moved; the wave is not judged")
		g.Consistently(func() *meshv1.RolloutStatus { return getMesh().Status.Rollout }).WithTimeout(4*time.Second).Should(And(
			HaveField("Wave", int32(2)), HaveField("Message", ContainSubstring("attest on node-mid"))), "it holds")
		g.Expect(podRevisions(g, "ztunnel")).To(HaveKeyWithValue("node-old", "1-26-4"), "the next wave has not started")
		g.Expect(planStep(getMesh(), "UpgradeNodeComponents").Message).To(ContainSubstring("waiting for the SPIRE agent to attest on node-mid"))
		g.Expect(identityStatus().AgentsAttested).To(Equal("2/3"))
	})

	t.Run("once the agent attests the waves go on and the rollout completes", func(t *testing.T) {
		g := NewWithT(t)
		attestAgentOn(t, s, "node-mid")
		g.Expect(attestedNodes(g, s)).To(Equal([]string{"node-mid", "node-new", "node-old"}))
		g.Eventually(identityStatus).Should(HaveField("AgentsAttested", "3/3"))
		g.Eventually(lastHistory).WithTimeout(slow).Should(And(HaveField("Version", "1.27.3"), HaveField("Outcome", meshv1.OutcomeSucceeded)))
		g.Expect(podRevisions(g, "ztunnel")).To(Equal(map[string]string{"node-new": "1-27-3", "node-mid": "1-27-3", "node-old": "1-27-3"}))
	})
}

// TestSpireAgentsWaitForTheServer: spire-agent is not applied while the
// SPIRE server's API does not answer, even with spire-server's StatefulSet
// ready; the component says why, and the agents roll out once the real
// server answers.
func TestSpireAgentsWaitForTheServer(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	// The server runs from the start (it is stopped after the Mesh is
	// gone), but the manager is pointed at a socket where none answers.
	s := spire.StartServer(t, spire.ServerOptions{})
	dir := spire.ShortTempDir(t, "mkg")
	testSpire.set(filepath.Join(dir, "api.sock"))
	t.Cleanup(func() { testSpire.set("") })

	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:   "1.28",
			Dataplane: meshv1.DataplaneSpec{Mode: meshv1.ModeSidecar},
			Identity:  meshv1.IdentitySpec{Spire: &meshv1.SpireSpec{Enabled: true, TrustDomain: "example.org"}},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })
	dumpMeshOnFailure(t)

	agentSet := func() error {
		return k8s.Get(ctx, client.ObjectKey{Namespace: componentsNamespace, Name: "spire-agent"}, &appsv1.DaemonSet{})
	}
	component := func(name string) meshv1.ComponentStatus {
		if m := getMesh(); m != nil {
			if c := findComponent(m.Status.Components, name); c != nil {
				return *c
			}
		}
		return meshv1.ComponentStatus{}
	}
	g.Eventually(component).WithArguments("spire-server").WithTimeout(slow).Should(HaveField("Ready", true))
	g.Eventually(component).WithArguments("spire-agent").Should(And(HaveField("Ready", false),
		HaveField("Message", ContainSubstring("waiting for the SPIRE server API to answer before the agents roll out"))))
	g.Consistently(agentSet).WithTimeout(3*time.Second).Should(MatchError(ContainSubstring("not found")), "no agent is applied while the server's API is silent")

	testSpire.set(s.Socket)
	g.Eventually(agentSet).WithTimeout(slow).Should(Succeed())
	g.Eventually(component).WithArguments("spire-agent").WithTimeout(slow).Should(HaveField("Ready", true))
}
