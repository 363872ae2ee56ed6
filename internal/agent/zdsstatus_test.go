package agent

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	. "github.com/onsi/gomega"
	"istio.io/istio/pkg/zdsapi"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/agent/zds"
	"github.com/meshkeeper/meshkeeper/test/zdsclient"
)

const refusal = "failed to get a workload certificate"

var (
	refusedPod = PodRef{Namespace: "shop", Name: "refused", UID: "0b1c2d3e-4f50-4a6b-8c7d-8e9f0a1b2c3d", ServiceAccount: "web"}
	takenPod   = PodRef{Namespace: "shop", Name: "taken", UID: "1c2d3e4f-5061-4b7c-9d8e-9f0a1b2c3d4e", ServiceAccount: "web"}
)

// zdsScenario is a real datapath, the agent's real ZDS server on a socket
// of its own, an enroller handing pods to it, and the test's ZDS client
// (test/zdsclient, ztunnel's side) that refuses refusedPod and takes every
// other pod.
type zdsScenario struct {
	enroller *Enroller
	server   *zds.Server
	mu       sync.Mutex
	client   *zdsclient.Client
}

func newZDSScenario(t testing.TB) *zdsScenario {
	t.Helper()
	g := NewWithT(t)
	dp, _ := loadTestDatapath(t, capturePort)
	dir, err := os.MkdirTemp("", "zds")
	g.Expect(err).NotTo(HaveOccurred())
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &zdsScenario{server: zds.NewServer(zds.Options{Path: filepath.Join(dir, "ztunnel.sock"), Log: testr.NewWithInterface(t, testr.Options{}), KeepaliveInterval: 50 * time.Millisecond})}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.server.Serve(ctx) }()
	t.Cleanup(func() {
		s.disconnect()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	<-s.server.Serving()
	s.enroller, err = NewEnroller(dp, "", testr.NewWithInterface(t, testr.Options{}))
	g.Expect(err).NotTo(HaveOccurred())
	s.enroller.SetHandoff(s.server)
	return s
}

// connect is a ztunnel connecting: it answers every request (the snapshot,
// then adds and deletes) until disconnect, refusing refusedPod's adds.
func (s *zdsScenario) connect(t testing.TB) {
	t.Helper()
	c, err := zdsclient.Dial(s.server.Path(), zdsapi.Version_V1)
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.client = c
	s.mu.Unlock()
	go func() {
		for {
			r, err := c.Recv(time.Minute)
			if err != nil {
				return
			}
			msg := ""
			if r.Netns != nil {
				r.Netns.Close()
			}
			if r.Kind == zdsclient.Add && r.UID == refusedPod.UID {
				msg = refusal
			}
			if c.Ack(msg) != nil {
				return
			}
		}
	}()
	NewWithT(t).Eventually(s.server.Connected).Should(Equal(1))
}

func (s *zdsScenario) disconnect() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client != nil {
		s.client.Close()
		s.client = nil
	}
}

// TestEnrolmentCountsOnlyWhatZtunnelTook: a pod whose netns ztunnel refused
// (an error ack) is redirected (fail closed) but not enrolled, with
// ztunnel's error as the reason; with no ztunnel connected no pod is, and
// the reason says so; a ztunnel that connects and takes them from its
// snapshot enrols them.
func TestEnrolmentCountsOnlyWhatZtunnelTook(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	s := newZDSScenario(t)
	s.connect(t)
	refusedNS, takenNS := newTestNetns(t), newTestNetns(t)
	g.Expect(s.enroller.EnrollPath(refusedPod, refusedNS.Path)).To(Succeed())
	g.Expect(s.enroller.EnrollPath(takenPod, takenNS.Path)).To(Succeed())
	g.Expect(s.enroller.Cookies(refusedPod.UID)).To(ConsistOf(refusedNS.Cookie(t)), "redirected all the same: its traffic never leaves the mesh unseen")

	wanted, enrolled, waiting := s.enroller.Enrolment()
	g.Expect([]int{wanted, enrolled}).To(Equal([]int{2, 1}))
	g.Expect(waiting).To(ConsistOf(And(HaveField("Pod", refusedPod), HaveField("Reason", "ztunnel refused: "+refusal))))

	s.disconnect()
	g.Eventually(s.server.Connected).Should(BeZero())
	_, enrolled, waiting = s.enroller.Enrolment()
	g.Expect(enrolled).To(BeZero())
	g.Expect(waiting).To(ConsistOf(
		And(HaveField("Pod", refusedPod), HaveField("Reason", "no ztunnel connected")),
		And(HaveField("Pod", takenPod), HaveField("Reason", "no ztunnel connected"))))

	s.connect(t)
	g.Eventually(func() []PodWaiting { _, _, w := s.enroller.Enrolment(); return w }).Should(
		ConsistOf(And(HaveField("Pod", refusedPod), HaveField("Reason", "ztunnel refused: "+refusal))), "the new ztunnel took the other one from its snapshot")
}

// TestMeshNodeSaysWhyZtunnelHasNoPod: the agent's MeshNode status writer,
// against a real API server, reports a pod ztunnel refused as not enrolled
// with ztunnel's error, and every pod as "no ztunnel connected" while none
// is; that is what the Mesh's PodsNotEnrolled message quotes.
func TestMeshNodeSaysWhyZtunnelHasNoPod(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	env := startAPIServer(t, filepath.Join("..", "..", "config", "crd", "bases"))
	kube, err := NewKubeClients(env.Config)
	g.Expect(err).NotTo(HaveOccurred())
	s := newZDSScenario(t)
	s.connect(t)
	refusedNS, takenNS := newTestNetns(t), newTestNetns(t)
	g.Expect(s.enroller.EnrollPath(refusedPod, refusedNS.Path)).To(Succeed())
	g.Expect(s.enroller.EnrollPath(takenPod, takenNS.Path)).To(Succeed())

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const node = "node-zds"
	reporter := startNodeReporter(ctx, kube.Mesh, node, testr.NewWithInterface(t, testr.Options{}))
	go reportEnrolment(ctx, s.enroller, reporter, v1alpha1.MeshNodeStatus{Eligible: true, Redirection: v1alpha1.NodeRedirectionEBPF})
	enrolment := func() *v1alpha1.NodeEnrolment {
		mn := &v1alpha1.MeshNode{}
		if err := kube.Mesh.Get().Resource("meshnodes").Name(node).Do(ctx).Into(mn); err != nil {
			return nil
		}
		return mn.Status.Enrolment
	}
	pod := func(ref PodRef, reason string) any {
		return And(HaveField("Namespace", ref.Namespace), HaveField("Name", ref.Name), HaveField("Reason", reason))
	}
	g.Eventually(enrolment).WithTimeout(15 * time.Second).Should(And(Not(BeNil()),
		HaveField("Wanted", BeEquivalentTo(2)), HaveField("Enrolled", BeEquivalentTo(1)),
		HaveField("NotEnrolled", ConsistOf(pod(refusedPod, "ztunnel refused: "+refusal)))))

	s.disconnect()
	g.Eventually(enrolment).WithTimeout(15 * time.Second).Should(And(
		HaveField("Enrolled", BeEquivalentTo(0)),
		HaveField("NotEnrolled", ConsistOf(pod(refusedPod, "no ztunnel connected"), pod(takenPod, "no ztunnel connected")))))
}
