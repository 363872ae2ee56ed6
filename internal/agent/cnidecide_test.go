package agent

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	. "github.com/onsi/gomega"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/meshkeeper/meshkeeper/internal/agent/cni"
)

// startAPIServer runs etcd and kube-apiserver (hack/cluster-bins.sh)
// until the test ends; it skips without them unless
// MESHKEEPER_REQUIRE_CLUSTER=1. crdDirs are installed.
func startAPIServer(t *testing.T, crdDirs ...string) *envtest.Environment {
	t.Helper()
	dir := os.Getenv("KUBEBUILDER_ASSETS")
	if dir == "" {
		dir = filepath.Join("..", "..", "bin", "cluster")
	}
	if _, err := os.Stat(filepath.Join(dir, "kube-apiserver")); err != nil {
		msg := "needs etcd and kube-apiserver in " + dir + " (" + err.Error() + "): run hack/cluster-bins.sh or set KUBEBUILDER_ASSETS"
		if os.Getenv("MESHKEEPER_REQUIRE_CLUSTER") == "1" {
			t.Fatal(msg + "; MESHKEEPER_REQUIRE_CLUSTER=1 makes this a failure")
		}
		t.Skip(msg + "; set MESHKEEPER_REQUIRE_CLUSTER=1 to fail instead of skipping")
	}
	env := &envtest.Environment{BinaryAssetsDirectory: dir, CRDDirectoryPaths: crdDirs, ErrorIfCRDPathMissing: len(crdDirs) > 0}
	if _, err := env.Start(); err != nil {
		t.Fatalf("start the API server: %v", err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	return env
}

// TestCNIHandlerDecidesLikeTheWatcher: against a real API server and the
// real datapath, the agent's answer to the plugin: a pod of a meshed
// namespace is enrolled before the answer, also one its node-filtered cache
// has not seen (read from the API server); an opted-out pod, a pod of an
// unmeshed namespace and a host-network pod are skipped; a pod that does
// not exist, or whose UID is another sandbox's, fails the ADD (fail
// closed); CHECK and DEL follow the map.
func TestCNIHandlerDecidesLikeTheWatcher(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	env := startAPIServer(t)
	kube, err := NewKubeClients(env.Config)
	g.Expect(err).NotTo(HaveOccurred())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	create := func(obj any, resource, ns string) {
		t.Helper()
		req := kube.Core.Post().Resource(resource).Body(obj)
		if ns != "" {
			req = req.Namespace(ns)
		}
		g.Expect(req.Do(ctx).Error()).To(Succeed())
	}
	create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "meshed", Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}, "namespaces", "")
	create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "plain"}}, "namespaces", "")
	pod := func(ns, name, node string, mut func(*corev1.Pod)) *corev1.Pod {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "c", Image: "meshkeeper.test/workload:dev"}}},
		}
		if mut != nil {
			mut(p)
		}
		create(p, "pods", ns)
		got := &corev1.Pod{}
		g.Expect(kube.Core.Get().Namespace(ns).Resource("pods").Name(name).Do(ctx).Into(got)).To(Succeed())
		return got
	}

	dp, _ := loadTestDatapath(t, capturePort)
	enroller, err := NewEnroller(dp, "", testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	w := &PodWatcher{Client: kube.Core, NodeName: "n1", NamespaceSelector: DefaultNamespaceSelector, Enroller: enroller, Log: testr.New(t)}
	go func() { _ = w.Run(ctx) }()
	h := &CNIHandler{Pods: w, Enroller: enroller, Log: testr.New(t)}

	count := func(result cni.Result) float64 {
		return testutil.ToFloat64(cniRequests.WithLabelValues(string(cni.CommandAdd), string(result)))
	}
	enrolledBefore, skippedBefore, errorsBefore := count(cni.ResultEnrolled), count(cni.ResultSkipped), count(cni.ResultError)
	netns := newTestNetns(t)
	ask := func(cmd cni.Command, p *corev1.Pod, uid string) cni.Response {
		t.Helper()
		f, err := os.Open(netns.Path)
		g.Expect(err).NotTo(HaveOccurred())
		defer f.Close()
		rctx, cancel := context.WithTimeout(ctx, 4*time.Second)
		defer cancel()
		return h.Handle(rctx, cni.Request{Version: cni.ProtocolVersion, Command: cmd, Namespace: p.Namespace, Name: p.Name, UID: uid}, f)
	}

	// On this node, created just now: the answer waits for the enrolment.
	web := pod("meshed", "web", "n1", nil)
	g.Expect(ask(cni.CommandAdd, web, string(web.UID))).To(Equal(cni.Response{Result: cni.ResultEnrolled}))
	g.Expect(enroller.Cookies(string(web.UID))).To(ConsistOf(netns.Cookie(t)))
	g.Expect(ask(cni.CommandCheck, web, string(web.UID)).Result).To(Equal(cni.ResultEnrolled))
	g.Expect(ask(cni.CommandDel, web, string(web.UID)).Result).To(Equal(cni.ResultEnrolled))
	g.Expect(dp.EnrolledNetns()).To(BeEmpty())
	r := ask(cni.CommandCheck, web, string(web.UID))
	g.Expect(r.Result).To(Equal(cni.ResultError))
	g.Expect(r.Message).To(ContainSubstring("not enrolled"))

	// Not in the node-filtered cache (bound elsewhere as far as the cache
	// knows): read from the API server.
	other := pod("meshed", "other", "n2", nil)
	g.Expect(ask(cni.CommandAdd, other, string(other.UID)).Result).To(Equal(cni.ResultEnrolled))
	enroller.Forget(string(other.UID))

	for _, tc := range []struct {
		p    *corev1.Pod
		want string
	}{
		{pod("meshed", "opted-out", "n1", func(p *corev1.Pod) { p.Labels = map[string]string{"istio.io/dataplane-mode": "none"} }), "dataplane-mode=none"},
		{pod("meshed", "hostnet", "n1", func(p *corev1.Pod) { p.Spec.HostNetwork = true }), "host network"},
		{pod("plain", "web", "n1", nil), "namespace plain is not in the mesh"},
	} {
		r := ask(cni.CommandAdd, tc.p, string(tc.p.UID))
		g.Expect(r.Result).To(Equal(cni.ResultSkipped), tc.p.Name)
		g.Expect(r.Message).To(ContainSubstring(tc.want))
	}
	g.Expect(dp.EnrolledNetns()).To(BeEmpty())

	r = ask(cni.CommandAdd, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "meshed", Name: "ghost"}}, "0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a")
	g.Expect(r.Result).To(Equal(cni.ResultError))
	g.Expect(r.Message).To(ContainSubstring("does not exist"))
	r = ask(cni.CommandAdd, web, "0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a")
	g.Expect(r.Result).To(Equal(cni.ResultError))
	g.Expect(r.Message).To(ContainSubstring("the sandbox is for"))
	g.Expect(dp.EnrolledNetns()).To(BeEmpty())
	// What /metrics says of these ADDs.
	g.Expect([]float64{count(cni.ResultEnrolled) - enrolledBefore, count(cni.ResultSkipped) - skippedBefore, count(cni.ResultError) - errorsBefore}).To(Equal([]float64{2, 3, 2}))
}
