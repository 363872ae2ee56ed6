package controller

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/identity"
	"github.com/meshkeeper/meshkeeper/test/spire"
)

// testSpire is the SPIRE server the suite's reconciler reaches: none
// (registration off) unless a test points it at one.
var testSpire spireTarget

type spireTarget struct {
	mu     sync.Mutex
	socket string
	// Through the relay at relayAddr (its certificate valid for
	// relayName) with the manager's relay Secret, when relay is set.
	relayAddr, relayName string
	relayCfg             *SpireRelay
}

// setRelay points the suite's reconciler at a relay (nil: none).
func (s *spireTarget) setRelay(addr, name string, cfg *SpireRelay) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.relayAddr, s.relayName, s.relayCfg = addr, name, cfg
}

func (s *spireTarget) relay() *SpireRelay {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.relayCfg
}

func (s *spireTarget) set(socket string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.socket = socket
}

func (s *spireTarget) connect(ctx context.Context) (identity.Server, error) {
	s.mu.Lock()
	socket, relayAddr, relayName, relayCfg := s.socket, s.relayAddr, s.relayName, s.relayCfg
	s.mu.Unlock()
	if relayCfg != nil {
		return identity.SecretConnector(relayAddr, relayName,
			secretData(client.ObjectKey{Namespace: relayCfg.Namespace, Name: relayCfg.Secret}))(ctx)
	}
	if socket == "" {
		return nil, identity.ErrNotConfigured
	}
	return identity.Dial("unix://"+socket, nil)
}

// serverEntries lists the real server's entries as SPIFFE IDs.
func serverEntries(g Gomega, s *spire.Server) []string {
	srv, err := identity.Dial("unix://"+s.Socket, nil)
	g.Expect(err).NotTo(HaveOccurred())
	defer srv.Close()
	es, err := srv.ListEntries(context.Background())
	g.Expect(err).NotTo(HaveOccurred())
	out := make([]string, 0, len(es))
	for _, e := range es {
		out = append(out, e.SPIFFEID)
	}
	slices.Sort(out)
	return out
}

func mkSA(g Gomega, ns, name string) {
	g.Expect(k8s.Create(context.Background(), &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}})).To(Succeed())
}

func identityStatus() *meshv1.IdentityStatus {
	if m := getMesh(); m != nil {
		return m.Status.Identity
	}
	return nil
}

func degraded() *metav1.Condition {
	if m := getMesh(); m != nil {
		return meta.FindStatusCondition(m.Status.Conditions, meshv1.ConditionDegraded)
	}
	return nil
}

// TestIdentityRegistration runs meshkeeper's registration against a real
// spire-server v1.13.3 that already holds foreign entries: the dry run and
// its acknowledgement, entries following namespaces and service accounts,
// the server going down and coming back, an X.509 SVID really issued by a
// real spire-agent to a workload, and the Mesh's deletion. The foreign
// entries survive all of it.
func TestIdentityRegistration(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	g.SetDefaultEventuallyTimeout(slow)
	g.SetDefaultEventuallyPollingInterval(100 * time.Millisecond)

	s := spire.StartServer(t, spire.ServerOptions{
		Kubeconfig:         kc.KubeconfigPath,
		PSATServiceAccount: componentsNamespace + ":spire-agent",
	})
	// Foreign entries, written with the spire-server CLI before meshkeeper
	// meets the server: a join-token node entry, a static entry, and an entry
	// with the very selectors meshkeeper's id-shop/cart entry will have.
	tok, err := s.JoinToken("spiffe://example.org/legacy/node-a")
	g.Expect(err).NotTo(HaveOccurred())
	for _, args := range [][]string{
		{"entry", "create", "-node", "-spiffeID", "spiffe://example.org/legacy/nodes", "-selector", "spiffe_id:spiffe://example.org/spire/agent/join_token/" + tok},
		{"entry", "create", "-parentID", "spiffe://example.org/legacy/nodes", "-spiffeID", "spiffe://example.org/static/db", "-selector", "unix:uid:999"},
		{"entry", "create", "-parentID", "spiffe://example.org/legacy/nodes", "-spiffeID", "spiffe://example.org/legacy/cart", "-selector", "k8s:ns:id-shop", "-selector", "k8s:sa:cart"},
	} {
		_, err := s.CLI(args...)
		g.Expect(err).NotTo(HaveOccurred())
	}
	foreign := serverEntries(g, s)
	// The join token made a join-token entry for its agent ID: four in all.
	g.Expect(foreign).To(HaveLen(4))
	foreignShown, err := s.CLI("entry", "show", "-output", "json")
	g.Expect(err).NotTo(HaveOccurred())

	testSpire.set(s.Socket)
	t.Cleanup(func() { testSpire.set("") })

	mkNS(g, "id-shop", map[string]string{"id-mesh": "on"})
	mkNS(g, "id-pay", nil)
	mkSA(g, "id-shop", "cart")
	mkSA(g, "id-pay", "checkout")
	mesh := &meshv1.Mesh{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.MeshSpec{
			Version:    "1.28",
			Dataplane:  meshv1.DataplaneSpec{Mode: meshv1.ModeSidecar},
			Namespaces: meshv1.NamespacesSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"id-mesh": "on"}}},
			Identity: meshv1.IdentitySpec{Spire: &meshv1.SpireSpec{Enabled: true, TrustDomain: "example.org",
				SVIDTTL: &metav1.Duration{Duration: 2 * time.Hour}}},
		},
	}
	g.Expect(k8s.Create(ctx, mesh)).To(Succeed())
	t.Cleanup(func() { deleteMeshAndWait(t) })

	shopEntries := []string{
		"spiffe://example.org/meshkeeper/cluster/meshkeeper",
		"spiffe://example.org/ns/id-shop/sa/cart",
		"spiffe://example.org/ns/id-shop/sa/default",
	}

	t.Run("the first reconcile against a server with entries is a dry run, held by the conflict", func(t *testing.T) {
		g := NewWithT(t)
		g.Eventually(func() *meshv1.IdentityDryRun {
			if st := identityStatus(); st != nil {
				return st.DryRun
			}
			return nil
		}).WithTimeout(slow).ShouldNot(BeNil())
		st := identityStatus()
		g.Expect(st.Registration).To(Equal(meshv1.RegistrationDryRun))
		g.Expect(st.TrustDomain).To(Equal("example.org"))
		dr := st.DryRun
		g.Expect(dr.Actions).To(ConsistOf(
			"create spiffe://example.org/meshkeeper/cluster/meshkeeper",
			"create spiffe://example.org/ns/id-shop/sa/cart",
			"create spiffe://example.org/ns/id-shop/sa/default",
		))
		g.Expect([]int32{dr.Create, dr.Update, dr.Delete, dr.Unchanged, dr.LeftAlone}).To(Equal([]int32{3, 0, 0, 0, 4}))
		g.Expect(dr.Conflicts).To(HaveLen(1))
		g.Expect(dr.Conflicts[0]).To(And(ContainSubstring("spiffe://example.org/legacy/cart"), ContainSubstring("spiffe://example.org/ns/id-shop/sa/cart")))
		g.Expect(st.Entries).To(Equal(meshv1.EntryCounts{Own: 0, Foreign: 4}))
		g.Eventually(degraded).Should(And(Not(BeNil()), HaveField("Reason", meshv1.ReasonIdentityDryRun),
			HaveField("Message", ContainSubstring("acknowledgeDryRun: \""+dr.Digest+"\""))))
		g.Consistently(func() []string { return serverEntries(g, s) }).WithTimeout(2*time.Second).Should(Equal(foreign), "a dry run writes nothing")
	})

	t.Run("acknowledging the dry run's digest applies it", func(t *testing.T) {
		g := NewWithT(t)
		digest := identityStatus().DryRun.Digest
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Identity.Spire.AcknowledgeDryRun = digest })
		g.Eventually(func() []string { return serverEntries(g, s) }).Should(ConsistOf(append(slices.Clone(shopEntries), foreign...)))
		g.Eventually(identityStatus).Should(And(
			HaveField("Registration", meshv1.RegistrationActive),
			HaveField("Entries", meshv1.EntryCounts{Own: 3, Foreign: 4})))
		g.Eventually(degraded).Should(BeNil())
	})

	t.Run("entries follow namespaces and service accounts within seconds", func(t *testing.T) {
		g := NewWithT(t)
		start := time.Now()
		setLabel(g, "id-pay", "id-mesh", "on")
		payEntries := []string{"spiffe://example.org/ns/id-pay/sa/checkout", "spiffe://example.org/ns/id-pay/sa/default"}
		g.Eventually(func() []string { return serverEntries(g, s) }).WithTimeout(10 * time.Second).Should(ContainElements(payEntries))
		t.Logf("MEASURE new meshed namespace (2 service accounts) until its entries exist on the SPIRE server: %v", time.Since(start).Round(time.Millisecond))

		start = time.Now()
		mkSA(g, "id-shop", "search")
		g.Eventually(func() []string { return serverEntries(g, s) }).WithTimeout(10 * time.Second).Should(ContainElement("spiffe://example.org/ns/id-shop/sa/search"))
		t.Logf("MEASURE new service account until its entry exists: %v", time.Since(start).Round(time.Millisecond))
		g.Expect(k8s.Delete(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: "id-shop", Name: "search"}})).To(Succeed())
		g.Eventually(func() []string { return serverEntries(g, s) }).WithTimeout(10 * time.Second).ShouldNot(ContainElement("spiffe://example.org/ns/id-shop/sa/search"))

		setLabel(g, "id-pay", "id-mesh", "off")
		g.Eventually(func() []string { return serverEntries(g, s) }).WithTimeout(10*time.Second).
			Should(ConsistOf(append(slices.Clone(shopEntries), foreign...)), "a namespace leaving the mesh takes its entries along, and only those")
	})

	t.Run("server down: nothing is deleted, Degraded, recovers", func(t *testing.T) {
		g := NewWithT(t)
		before := serverEntries(g, s)
		s.Stop()
		// Churn while the server is away: nothing can be written, and nothing
		// meshkeeper decides on a missing view deletes anything later.
		mkSA(g, "id-shop", "late")
		g.Eventually(degraded).Should(And(Not(BeNil()), HaveField("Reason", meshv1.ReasonIdentityUnavailable),
			HaveField("Message", ContainSubstring("no entry is changed"))))
		g.Expect(s.Start()).To(Succeed())
		g.Eventually(func() []string { return serverEntries(g, s) }).Should(ConsistOf(append(slices.Clone(before), "spiffe://example.org/ns/id-shop/sa/late")))
		g.Eventually(degraded).Should(BeNil())
		g.Expect(serverEntries(g, s)).To(ContainElements(foreign))
	})

	t.Run("a real spire-agent issues the SVID to a workload of a meshed namespace", func(t *testing.T) {
		svidIssued(t, s)
	})

	t.Run("a trust-domain change of the running mesh is refused", func(t *testing.T) {
		g := NewWithT(t)
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Identity.Spire.TrustDomain = "other.org" })
		g.Eventually(func() *metav1.Condition {
			return meta.FindStatusCondition(getMesh().Status.Conditions, meshv1.ConditionStalled)
		}).Should(And(Not(BeNil()), HaveField("Message", ContainSubstring(`set it back to "example.org"`))))
		g.Consistently(func() []string { return serverEntries(g, s) }).WithTimeout(2 * time.Second).ShouldNot(ContainElement(ContainSubstring("other.org")))
		updateMesh(g, func(m *meshv1.Mesh) { m.Spec.Identity.Spire.TrustDomain = "example.org" })
		g.Eventually(func() *metav1.Condition {
			return meta.FindStatusCondition(getMesh().Status.Conditions, meshv1.ConditionStalled)
		}).Should(BeNil())
	})

	t.Run("deleting the Mesh removes exactly meshkeeper's entries", func(t *testing.T) {
		g := NewWithT(t)
		deleteMeshAndWait(t)
		g.Expect(serverEntries(g, s)).To(Equal(foreign))
		after, err := s.CLI("entry", "show", "-output", "json")
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(after).To(MatchJSON(foreignShown), "the foreign entries are exactly as they were")
	})
}

// svidIssued gets an X.509 SVID from the real spire-agent's Workload API as
// a workload of id-shop/cart and checks its SPIFFE ID and TTL.
//
// Why this route: there is no kubelet on the host (real kubelet nodes are
// another branch), so the chain is as real as this machine allows.
//   - Node attestation is the production one, k8s_psat: the agent presents
//     a projected token of the spire-agent service account bound to the
//     chart's spire-agent pod on node-new, and the real server validates it
//     with a TokenReview against the local cluster's API server. Its
//     selectors make the agent match meshkeeper's node alias entry.
//   - Workload attestation is the production k8s attestor: it maps the
//     caller's PID to a pod UID and container ID through the caller's
//     cgroup, then finds that container in the kubelet's pod list. The
//     workload process is put in a cgroup named as the kubelet names it
//     (.../pod<uid>/<container id>); the pod list is the real Pod from the
//     API server, served by a kubelet stand-in (test/spire) that adds the
//     container ID, as the kubelet would.
//   - The workload is `spire-agent api fetch x509`, a real Workload API
//     client, and the entry is the one meshkeeper wrote: unchanged
//     k8s:ns/k8s:sa selectors, parent the node alias.
func svidIssued(t *testing.T, s *spire.Server) {
	g := NewWithT(t)
	ctx := context.Background()
	if os.Geteuid() != 0 {
		if os.Getenv("MESHKEEPER_REQUIRE_PRIVILEGED") == "1" {
			t.Fatal("the SVID test needs root (a cgroup for the workload process); MESHKEEPER_REQUIRE_PRIVILEGED=1")
		}
		t.Skip("SKIP: the SVID test needs root to put the workload process in a pod-like cgroup")
	}
	const node = "node-new"

	// The spire-agent pod the chart put on the node (kwok runs it).
	var agentPod corev1.Pod
	g.Eventually(func() error {
		var pods corev1.PodList
		if err := k8s.List(ctx, &pods, client.InNamespace(componentsNamespace), client.MatchingLabels{"app": "spire-agent"}); err != nil {
			return err
		}
		for _, p := range pods.Items {
			if p.Spec.NodeName == node {
				agentPod = p
				return nil
			}
		}
		return fmt.Errorf("no spire-agent pod on %s yet", node)
	}).Should(Succeed())
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
	dir := spire.ShortTempDir(t, "mkw")
	tokenFile := filepath.Join(dir, "token")
	g.Expect(os.WriteFile(tokenFile, []byte(tr.Status.Token), 0o600)).To(Succeed())

	// The workload's pod, on the same node.
	wl := &corev1.Pod{
		// No istiod runs here to inject a sidecar; the SVID is the agent's.
		ObjectMeta: metav1.ObjectMeta{Namespace: "id-shop", Name: "cart-0", Labels: map[string]string{"sidecar.istio.io/inject": "false"}},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: "cart",
			Containers:  []corev1.Container{{Name: "app", Image: "example.com/cart:1"}},
			Tolerations: []corev1.Toleration{{Operator: corev1.TolerationOpExists}}},
	}
	g.Expect(k8s.Create(ctx, wl)).To(Succeed())
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), wl) })
	cidBytes := make([]byte, 32)
	_, _ = rand.Read(cidBytes)
	containerID := hex.EncodeToString(cidBytes)
	port := spire.StartKubeletPodsStandIn(t, func() []corev1.Pod {
		var pods corev1.PodList
		if err := k8s.List(context.Background(), &pods, client.MatchingFields{"spec.nodeName": node}); err != nil {
			return nil
		}
		for i := range pods.Items {
			if pods.Items[i].UID == wl.UID {
				pods.Items[i].Status.ContainerStatuses = []corev1.ContainerStatus{{
					Name: "app", Ready: true, Image: "example.com/cart:1", ImageID: "example.com/cart@sha256:" + strings.Repeat("0", 64),
					ContainerID: "containerd://" + containerID,
					State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: metav1.Now()}},
				}}
			}
		}
		return pods.Items
	})
	agent := spire.StartAgent(t, s, spire.AgentOptions{PSATTokenFile: tokenFile, NodeName: node, KubeletPort: port})

	// The agent attested as the node through k8s_psat, as meshkeeper's
	// node-wave gate reads it.
	srv, err := identity.Dial("unix://"+s.Socket, nil)
	g.Expect(err).NotTo(HaveOccurred())
	defer srv.Close()
	agents, err := srv.ListAgents(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(agents).To(HaveLen(1))
	g.Expect(agents[0].NodeName()).To(Equal(node))
	g.Expect(agents[0].Selectors).To(ContainElement("k8s_psat:cluster:meshkeeper"))

	// The workload process, in the pod's cgroup (pids hierarchy).
	cg := filepath.Join("/sys/fs/cgroup/pids", "meshkeeper-test-"+containerID[:8])
	leaf := filepath.Join(cg, "pod"+string(wl.UID), containerID)
	g.Expect(os.MkdirAll(leaf, 0o755)).To(Succeed())
	t.Cleanup(func() {
		_ = os.Remove(leaf)
		_ = os.Remove(filepath.Dir(leaf))
		_ = os.Remove(cg)
	})
	out := filepath.Join(dir, "svid")
	g.Expect(os.MkdirAll(out, 0o700)).To(Succeed())
	var fetched string
	g.Eventually(func() error {
		cmd := exec.Command("sh", "-c", `echo $$ > "$1/cgroup.procs" && exec "$2" api fetch x509 -socketPath "$3" -write "$4" -timeout 10s`,
			"workload", leaf, filepath.Join(s.BinDir, "spire-agent"), agent.WorkloadSocket, out)
		b, err := cmd.CombinedOutput()
		fetched = string(b)
		if err != nil {
			return fmt.Errorf("%v: %s", err, b)
		}
		return nil
	}).WithTimeout(60*time.Second).WithPolling(time.Second).Should(Succeed(), func() string { return agent.Logs() })
	t.Log(strings.TrimSpace(fetched))

	raw, err := os.ReadFile(filepath.Join(out, "svid.0.pem"))
	g.Expect(err).NotTo(HaveOccurred())
	block, _ := pem.Decode(raw)
	g.Expect(block).NotTo(BeNil())
	cert, err := x509.ParseCertificate(block.Bytes)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(cert.URIs).To(HaveLen(1))
	g.Expect(cert.URIs[0].String()).To(Equal("spiffe://example.org/ns/id-shop/sa/cart"))
	ttl := cert.NotAfter.Sub(cert.NotBefore)
	g.Expect(ttl).To(BeNumerically("~", 2*time.Hour, time.Minute), "the SVID's lifetime is spec.identity.spire.svidTTL")
	t.Logf("SVID %s, lifetime %v, issued by the real spire-agent to a workload of id-shop/cart", cert.URIs[0], ttl.Round(time.Second))
}
