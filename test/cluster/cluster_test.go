package cluster

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1alpha1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

func TestKwokConfigHasStages(t *testing.T) {
	cfg, err := KwokConfig()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"node-initialize", "node-heartbeat", "pod-ready", "pod-complete", "pod-delete"} {
		if !strings.Contains(string(cfg), "name: "+name+"\n") {
			t.Errorf("kwok config lacks stage %s", name)
		}
	}
	if n := strings.Count(string(cfg), "kind: Stage\n"); n != 5 {
		t.Errorf("kwok config has %d stages, want 5", n)
	}
}

func TestRepoRoot(t *testing.T) {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(root + "/go.mod")
	if err != nil || modulePathOf(data) != ModulePath {
		t.Fatalf("RepoRoot %s: go.mod module %q, err %v", root, modulePathOf(data), err)
	}
}

func TestCluster(t *testing.T) {
	SkipIfUnavailable(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	kernels := map[string]string{"node-a": "5.4.0", "node-b": "5.15.0", "node-c": "6.1.0"}
	var nodes []Node
	for _, name := range []string{"node-a", "node-b", "node-c"} {
		nodes = append(nodes, Node{Name: name, KernelVersion: kernels[name], Labels: map[string]string{"meshkeeper.dev/test": "yes"}})
	}
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	c, err := Start(ctx, Options{
		Nodes:             nodes,
		CRDDirectoryPaths: []string{filepath.Join(root, "config", "crd", "bases")},
		Stdout:            testWriter{t},
	})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Logf("Start took %v", time.Since(began).Round(time.Millisecond))
	stopped := false
	defer func() {
		if !stopped {
			_ = c.Stop()
		}
	}()

	t.Run("nodes", func(t *testing.T) {
		var list corev1.NodeList
		if err := c.Client.List(ctx, &list); err != nil {
			t.Fatal(err)
		}
		if len(list.Items) != 3 {
			t.Fatalf("%d nodes, want 3", len(list.Items))
		}
		for _, n := range list.Items {
			if !NodeReady(&n) {
				t.Errorf("node %s not Ready", n.Name)
			}
			if got, want := n.Status.NodeInfo.KernelVersion, kernels[n.Name]; got != want {
				t.Errorf("node %s kernelVersion %q, want %q", n.Name, got, want)
			}
			if n.Labels["meshkeeper.dev/test"] != "yes" || n.Labels[corev1.LabelHostname] != n.Name {
				t.Errorf("node %s labels %v", n.Name, n.Labels)
			}
		}
	})

	t.Run("daemonset", func(t *testing.T) {
		start := time.Now()
		ns := createNamespace(ctx, t, c, "ds-test")
		labels := map[string]string{"app": "agent"}
		ds := &appsv1.DaemonSet{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "agent"},
			Spec: appsv1.DaemonSetSpec{
				Selector: &metav1.LabelSelector{MatchLabels: labels},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: labels},
					Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "agent", Image: "example.invalid/agent:v1"}}},
				},
			},
		}
		if err := c.Client.Create(ctx, ds); err != nil {
			t.Fatal(err)
		}
		eventually(ctx, t, "DaemonSet 3/3 ready", func() (bool, string) {
			if err := c.Client.Get(ctx, client.ObjectKeyFromObject(ds), ds); err != nil {
				return false, err.Error()
			}
			s := ds.Status
			return s.ObservedGeneration == ds.Generation && s.DesiredNumberScheduled == 3 && s.NumberReady == 3 && s.UpdatedNumberScheduled == 3,
				strings.Join([]string{"desired", itoa(s.DesiredNumberScheduled), "ready", itoa(s.NumberReady)}, " ")
		})
		var pods corev1.PodList
		if err := c.Client.List(ctx, &pods, client.InNamespace(ns), client.MatchingLabels(labels)); err != nil {
			t.Fatal(err)
		}
		onNode := map[string]bool{}
		for _, p := range pods.Items {
			if p.Status.Phase != corev1.PodRunning || !podReady(&p) {
				t.Errorf("pod %s phase %s not ready", p.Name, p.Status.Phase)
			}
			if p.Status.PodIP == "" {
				t.Errorf("pod %s has no IP", p.Name)
			}
			onNode[p.Spec.NodeName] = true
		}
		if len(pods.Items) != 3 || len(onNode) != 3 {
			t.Errorf("%d pods on nodes %v, want one on each of 3 nodes", len(pods.Items), onNode)
		}
		t.Logf("DaemonSet ready in %v", time.Since(start).Round(time.Millisecond))
	})

	t.Run("deployment", func(t *testing.T) {
		start := time.Now()
		ns := createNamespace(ctx, t, c, "deploy-test")
		labels := map[string]string{"app": "web"}
		d := &appsv1.Deployment{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "web"},
			Spec: appsv1.DeploymentSpec{
				Replicas: ptr.To[int32](2),
				Selector: &metav1.LabelSelector{MatchLabels: labels},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: labels},
					Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "web", Image: "example.invalid/web:v1"}}},
				},
			},
		}
		if err := c.Client.Create(ctx, d); err != nil {
			t.Fatal(err)
		}
		eventually(ctx, t, "Deployment available", func() (bool, string) {
			if err := c.Client.Get(ctx, client.ObjectKeyFromObject(d), d); err != nil {
				return false, err.Error()
			}
			for _, cond := range d.Status.Conditions {
				if cond.Type == appsv1.DeploymentAvailable && cond.Status == corev1.ConditionTrue {
					return d.Status.AvailableReplicas == 2 && d.Status.UpdatedReplicas == 2, "available " + itoa(d.Status.AvailableReplicas)
				}
			}
			return false, "no Available condition, available " + itoa(d.Status.AvailableReplicas)
		})
		t.Logf("Deployment available in %v", time.Since(start).Round(time.Millisecond))
	})

	t.Run("add-node", func(t *testing.T) {
		start := time.Now()
		if err := c.AddNode(ctx, Node{Name: "node-d", KernelVersion: "6.6.0"}); err != nil {
			t.Fatal(err)
		}
		var n corev1.Node
		if err := c.Client.Get(ctx, client.ObjectKey{Name: "node-d"}, &n); err != nil {
			t.Fatal(err)
		}
		if !NodeReady(&n) || n.Status.NodeInfo.KernelVersion != "6.6.0" {
			t.Errorf("node-d ready=%v kernel=%q", NodeReady(&n), n.Status.NodeInfo.KernelVersion)
		}
		t.Logf("AddNode took %v", time.Since(start).Round(time.Millisecond))
	})

	t.Run("crds", func(t *testing.T) {
		var meshes meshv1alpha1.MeshList
		if err := c.Client.List(ctx, &meshes); err != nil {
			t.Errorf("list Meshes: %v", err)
		}
		var meshNodes meshv1alpha1.MeshNodeList
		if err := c.Client.List(ctx, &meshNodes); err != nil {
			t.Errorf("list MeshNodes: %v", err)
		}
	})

	t.Run("pod-in-new-namespace", func(t *testing.T) {
		ns := createNamespace(ctx, t, c, "pod-test")
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "p"},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Image: "example.invalid/c:v1"}}},
		}
		if err := c.Client.Create(ctx, pod); err != nil {
			t.Fatal(err)
		}
		eventually(ctx, t, "pod Ready", func() (bool, string) {
			if err := c.Client.Get(ctx, client.ObjectKeyFromObject(pod), pod); err != nil {
				return false, err.Error()
			}
			return podReady(pod) && pod.Spec.NodeName != "", string(pod.Status.Phase)
		})
		if err := c.Client.Delete(ctx, pod); err != nil {
			t.Fatal(err)
		}
		eventually(ctx, t, "pod gone", func() (bool, string) {
			err := c.Client.Get(ctx, client.ObjectKeyFromObject(pod), pod)
			return apierrors.IsNotFound(err), "still there"
		})
	})

	t.Run("kubectl", func(t *testing.T) {
		out, stderr, err := c.Kubectl(ctx, "get", "nodes", "-o", "wide")
		if err != nil {
			t.Fatalf("kubectl: %v (stderr %s)", err, stderr)
		}
		for _, want := range []string{"node-a", "node-b", "node-c", "Ready", "5.4.0", "5.15.0", "6.1.0"} {
			if !strings.Contains(out, want) {
				t.Errorf("kubectl get nodes output lacks %q:\n%s", want, out)
			}
		}
		t.Logf("kubectl get nodes -o wide:\n%s", out)
	})

	t.Run("egress-stays-local", func(t *testing.T) {
		egressStaysLocal(ctx, t, c)
	})

	pids := c.PIDs()
	for _, name := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"} {
		if pids[name] <= 0 {
			t.Errorf("no pid for %s: %v", name, pids)
		} else if !alive(pids[name]) {
			t.Errorf("%s (pid %d) not running before Stop", name, pids[name])
		}
	}
	stopStart := time.Now()
	stopped = true
	if err := c.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	t.Logf("Stop took %v", time.Since(stopStart).Round(time.Millisecond))
	if err := c.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	for name, pid := range pids {
		if alive(pid) {
			t.Errorf("%s (pid %d) still running after Stop", name, pid)
		}
	}
	if _, err := os.Stat(c.tmpDir); !os.IsNotExist(err) {
		t.Errorf("temp dir %s not removed: %v", c.tmpDir, err)
	}
}

// egressStaysLocal: admission webhooks whose servers are not on this machine
// (a Service whose only endpoint is a kwok pod, as istiod's when a bundle
// chart renders its webhooks and no istiod runs; a Service without
// endpoints; a URL off the machine) fail closed with an error that says so,
// and kube-apiserver never dials off the machine or a ClusterIP: the
// egress proxy refused and counted what it asked for.
func egressStaysLocal(ctx context.Context, t *testing.T, c *Cluster) {
	const caseLabel = "meshkeeper.dev/egress-test"
	ns := createNamespace(ctx, t, c, "egress-test")
	before := len(c.EgressRefused())

	labels := map[string]string{"app": "webhook"}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "webhook", Labels: labels},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "webhook", Image: "example.invalid/webhook:v1",
			Ports: []corev1.ContainerPort{{ContainerPort: 15017}},
		}}},
	}
	if err := c.Client.Create(ctx, pod); err != nil {
		t.Fatal(err)
	}
	eventually(ctx, t, "webhook pod Ready on a kwok node", func() (bool, string) {
		if err := c.Client.Get(ctx, client.ObjectKeyFromObject(pod), pod); err != nil {
			return false, err.Error()
		}
		return podReady(pod) && pod.Status.PodIP != "", string(pod.Status.Phase)
	})
	onKwok := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "on-kwok"},
		Spec:       corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{{Port: 443, TargetPort: intstr.FromInt32(15017)}}},
	}
	noEndpoints := &corev1.Service{ // no selector, no EndpointSlice
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "no-endpoints"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 443}}},
	}
	serviceRange := netip.MustParsePrefix(ServiceCIDR)
	var clusterIPs []string
	for _, svc := range []*corev1.Service{onKwok, noEndpoints} {
		if err := c.Client.Create(ctx, svc); err != nil {
			t.Fatal(err)
		}
		if ip, err := netip.ParseAddr(svc.Spec.ClusterIP); err != nil || !serviceRange.Contains(ip) {
			t.Fatalf("Service %s ClusterIP %q, want one in %s", svc.Name, svc.Spec.ClusterIP, ServiceCIDR)
		}
		clusterIPs = append(clusterIPs, svc.Spec.ClusterIP)
	}

	offMachineURL := "https://192.0.2.10:443/validate" // TEST-NET-1: no such host anywhere
	podTarget := pod.Status.PodIP + ":15017"
	cases := []struct {
		name   string
		client admissionregistrationv1.WebhookClientConfig
		want   string // in the admission error
	}{
		{"service-on-kwok", serviceRef(ns, onKwok.Name), "test cluster egress: " + podTarget + " is not on this machine"},
		{"service-no-endpoints", serviceRef(ns, noEndpoints.Name), `no endpoints available for service "no-endpoints"`},
		{"url-off-machine", admissionregistrationv1.WebhookClientConfig{URL: &offMachineURL}, "test cluster egress: 192.0.2.10:443 is not on this machine"},
	}
	vwc := &admissionregistrationv1.ValidatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: "meshkeeper-test-egress-stays-local"}}
	for _, tc := range cases {
		vwc.Webhooks = append(vwc.Webhooks, admissionregistrationv1.ValidatingWebhook{
			Name:         tc.name + ".egress.meshkeeper.dev",
			ClientConfig: tc.client,
			Rules: []admissionregistrationv1.RuleWithOperations{{
				Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create},
				Rule: admissionregistrationv1.Rule{
					APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"configmaps"},
					Scope: ptr.To(admissionregistrationv1.NamespacedScope),
				},
			}},
			NamespaceSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{corev1.LabelMetadataName: ns}},
			ObjectSelector:          &metav1.LabelSelector{MatchLabels: map[string]string{caseLabel: tc.name}},
			FailurePolicy:           ptr.To(admissionregistrationv1.Fail),
			SideEffects:             ptr.To(admissionregistrationv1.SideEffectClassNone),
			AdmissionReviewVersions: []string{"v1"},
			TimeoutSeconds:          ptr.To[int32](5),
		})
	}
	if err := c.Client.Create(ctx, vwc); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := c.Client.Delete(context.WithoutCancel(ctx), vwc); err != nil {
			t.Errorf("delete %s: %v", vwc.Name, err)
		}
	}()

	for _, tc := range cases {
		// Until kube-apiserver has seen the webhook (and the Service's
		// endpoints), creates succeed or fail otherwise: try again.
		var last string
		eventually(ctx, t, tc.name+": ConfigMap refused by the webhook", func() (bool, string) {
			cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, GenerateName: tc.name + "-", Labels: map[string]string{caseLabel: tc.name}}}
			err := c.Client.Create(ctx, cm)
			if err == nil {
				return false, "created " + cm.Name
			}
			last = err.Error()
			return strings.Contains(last, tc.want), last
		})
		t.Logf("%s: %s", tc.name, last)
		for _, bad := range []string{"x509", "certificate", "tls:"} {
			if strings.Contains(last, bad) {
				t.Errorf("%s: the error is about TLS (%q), not where the webhook is: %s", tc.name, bad, last)
			}
		}
	}

	refused := c.EgressRefused()[before:]
	for _, want := range []string{podTarget, "192.0.2.10:443"} {
		if !slices.Contains(refused, want) {
			t.Errorf("the egress proxy did not count a refusal of %s: refused %v", want, refused)
		}
	}
	for _, a := range c.EgressAttempts() {
		for _, ip := range clusterIPs {
			if strings.HasPrefix(a.Target, ip+":") {
				t.Errorf("kube-apiserver dialled ClusterIP %s (%+v): it must resolve a Service to its endpoints", ip, a)
			}
		}
		if !a.Refused {
			if ap, err := netip.ParseAddrPort(a.Target); err != nil || !ap.Addr().IsLoopback() {
				t.Errorf("the egress proxy connected kube-apiserver to %s, not on loopback (no real node here)", a.Target)
			}
		}
	}
	t.Logf("egress refused %d target(s): %v", len(refused), refused)
}

func serviceRef(ns, name string) admissionregistrationv1.WebhookClientConfig {
	return admissionregistrationv1.WebhookClientConfig{Service: &admissionregistrationv1.ServiceReference{
		Namespace: ns, Name: name, Path: ptr.To("/validate"), Port: ptr.To[int32](443),
	}}
}

// TestStartFailureCleansUp: a failing Start (a missing CRD directory makes
// envtest fail after etcd and kube-apiserver are up) reports the error and
// leaves no process and no temp dir behind.
func TestStartFailureCleansUp(t *testing.T) {
	SkipIfUnavailable(t)
	before := ourChildren()
	_, err := Start(context.Background(), Options{CRDDirectoryPaths: []string{"/nonexistent/crds"}})
	if err == nil {
		t.Fatal("Start succeeded with a missing CRD directory")
	}
	if !strings.Contains(err.Error(), "/nonexistent/crds") {
		t.Errorf("error does not name the missing path: %.300s", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var left []int
		for _, pid := range ourChildren() {
			if !slices.Contains(before, pid) {
				left = append(left, pid)
			}
		}
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("child processes left after failed Start: %v", left)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ourChildren lists the live (non-zombie) child processes of this process.
func ourChildren() []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(data)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(os.Getpid()) && f[0] != "Z" {
			pids = append(pids, pid)
		}
	}
	return pids
}

func alive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func createNamespace(ctx context.Context, t *testing.T, c *Cluster, name string) string {
	t.Helper()
	if err := c.CreateNamespace(ctx, name, nil); err != nil {
		t.Fatal(err)
	}
	return name
}

func eventually(ctx context.Context, t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	last := ""
	for {
		ok, why := cond()
		if ok {
			return
		}
		last = why
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s (last: %s)", what, last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func itoa(i int32) string { return strconv.Itoa(int(i)) }

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
