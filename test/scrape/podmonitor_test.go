package scrape

import (
	"bufio"
	"bytes"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"testing"

	. "github.com/onsi/gomega"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/helm"
	"github.com/meshkeeper/meshkeeper/test/cluster"
)

// podMonitor is the part of prometheus-operator's PodMonitor the shipped
// ones use (monitoring.coreos.com/v1; the operator's CRDs cannot run here).
type podMonitor struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       struct {
		Selector            metav1.LabelSelector `json:"selector"`
		PodMetricsEndpoints []struct {
			Port        string `json:"port"`
			Path        string `json:"path"`
			HonorLabels bool   `json:"honorLabels"`
		} `json:"podMetricsEndpoints"`
	} `json:"spec"`
}

// TestPodMonitorsSelectTheShippedPods: each shipped PodMonitor, and the
// matching job of the plain scrape config, selects the pods meshkeeper
// really deploys (the node agent from the newest bundle's chart, the
// manager from config/manager) in their namespace, by their labels, on a
// container port they really declare.
func TestPodMonitorsSelectTheShippedPods(t *testing.T) {
	g := NewWithT(t)
	root, err := cluster.RepoRoot()
	g.Expect(err).NotTo(HaveOccurred())

	// The node agent's pod template, as the newest bundle renders it.
	catalog := bundle.Default()
	versions := catalog.Versions()
	b, err := catalog.Resolve(versions[len(versions)-1])
	g.Expect(err).NotTo(HaveOccurred())
	chart, err := b.Chart(bundle.NodeAgent)
	g.Expect(err).NotTo(HaveOccurred())
	in := bundle.Inputs{Mode: "Ambient", Redirection: "EBPF", Namespace: "istio-system"}
	objs, err := helm.Render(chart, string(bundle.NodeAgent), in.Namespace, b.Values(bundle.NodeAgent, in), helm.ManagedLabels(string(bundle.NodeAgent), b.Revision()))
	g.Expect(err).NotTo(HaveOccurred())
	var agent *corev1.PodTemplateSpec
	for _, o := range objs {
		if o.GetKind() == "DaemonSet" {
			var ds appsv1.DaemonSet
			g.Expect(runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &ds)).To(Succeed())
			agent = &ds.Spec.Template
			agent.Namespace = ds.Namespace
		}
	}
	g.Expect(agent).NotTo(BeNil(), "the node-agent chart renders a DaemonSet")

	// The manager's pod template.
	var manager *corev1.PodTemplateSpec
	for _, doc := range yamlDocs(t, filepath.Join(root, "config", "manager", "manager.yaml")) {
		var d appsv1.Deployment
		if yaml.Unmarshal(doc, &d) == nil && d.Kind == "Deployment" {
			manager = &d.Spec.Template
			manager.Namespace = d.Namespace
		}
	}
	g.Expect(manager).NotTo(BeNil(), "config/manager has the manager Deployment")

	pods := map[string]*corev1.PodTemplateSpec{"meshkeeper-node-agent": agent, "meshkeeper-manager": manager}
	monitors := yamlDocs(t, filepath.Join(root, "config", "prometheus", "podmonitor.yaml"))
	g.Expect(monitors).To(HaveLen(2))
	for _, doc := range monitors {
		var pm podMonitor
		g.Expect(yaml.Unmarshal(doc, &pm)).To(Succeed())
		g.Expect(pm.APIVersion + " " + pm.Kind).To(Equal("monitoring.coreos.com/v1 PodMonitor"))
		pod := pods[pm.Metadata.Name]
		g.Expect(pod).NotTo(BeNil(), "a PodMonitor for %s", pm.Metadata.Name)
		g.Expect(pm.Metadata.Namespace).To(Equal(pod.Namespace), "%s: PodMonitors select pods of their own namespace", pm.Metadata.Name)
		sel, err := metav1.LabelSelectorAsSelector(&pm.Spec.Selector)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(sel.Matches(labels.Set(pod.Labels))).To(BeTrue(), "%s selects the pods (%v)", pm.Metadata.Name, pod.Labels)
		g.Expect(pm.Spec.PodMetricsEndpoints).To(HaveLen(1))
		g.Expect(pm.Spec.PodMetricsEndpoints[0].HonorLabels).To(BeFalse())
		g.Expect(ports(pod)).To(ContainElement(pm.Spec.PodMetricsEndpoints[0].Port), "%s scrapes a port the pod declares", pm.Metadata.Name)
	}

	// The plain scrape config keeps the same pods, by the labels pod SD
	// turns into __meta_kubernetes_pod_label_*.
	var jobs []struct {
		JobName        string `json:"job_name"`
		RelabelConfigs []struct {
			SourceLabels []string `json:"source_labels"`
			Regex        string   `json:"regex"`
			Action       string   `json:"action"`
			Separator    string   `json:"separator"`
		} `json:"relabel_configs"`
	}
	raw, err := os.ReadFile(filepath.Join(root, "config", "prometheus", "scrape-config.yaml"))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(yaml.Unmarshal(raw, &jobs)).To(Succeed())
	g.Expect(jobs).To(HaveLen(2))
	metaLabel := regexp.MustCompile(`[^a-zA-Z0-9_]`)
	jobPods := map[string]*corev1.PodTemplateSpec{"meshkeeper-agent": agent, "meshkeeper-manager": manager}
	for _, job := range jobs {
		pod := jobPods[job.JobName]
		g.Expect(pod).NotTo(BeNil(), "a job for %s", job.JobName)
		meta := map[string]string{"__meta_kubernetes_pod_phase": "Running", "__meta_kubernetes_namespace": pod.Namespace}
		for k, v := range pod.Labels {
			meta["__meta_kubernetes_pod_label_"+metaLabel.ReplaceAllString(k, "_")] = v
		}
		kept := 0
		for _, port := range ports(pod) {
			meta["__meta_kubernetes_pod_container_port_name"] = port
			if keeps(job.RelabelConfigs, meta) {
				kept++
				g.Expect(port).To(Equal("metrics"), job.JobName)
			}
		}
		g.Expect(kept).To(Equal(1), "%s keeps exactly the pod's metrics port", job.JobName)
	}
}

// keeps applies the keep and drop actions of relabel configs to a target's
// meta labels (Prometheus anchors regexes and joins source labels with ";").
func keeps(rcs []struct {
	SourceLabels []string `json:"source_labels"`
	Regex        string   `json:"regex"`
	Action       string   `json:"action"`
	Separator    string   `json:"separator"`
}, meta map[string]string) bool {
	for _, rc := range rcs {
		if rc.Action != "keep" && rc.Action != "drop" {
			continue
		}
		var vals [][]byte
		for _, l := range rc.SourceLabels {
			vals = append(vals, []byte(meta[l]))
		}
		sep := rc.Separator
		if sep == "" {
			sep = ";"
		}
		matched := regexp.MustCompile("^(?:" + rc.Regex + ")$").Match(bytes.Join(vals, []byte(sep)))
		if (rc.Action == "keep") != matched {
			return false
		}
	}
	return true
}

func ports(pod *corev1.PodTemplateSpec) []string {
	var out []string
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			out = append(out, p.Name)
		}
	}
	return out
}

func yamlDocs(t *testing.T, path string) [][]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := utilyaml.NewYAMLReader(bufio.NewReader(f))
	var docs [][]byte
	for {
		doc, err := r.Read()
		if err == io.EOF {
			return docs
		}
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if bytes.Contains(doc, []byte("\nkind:")) || bytes.HasPrefix(doc, []byte("kind:")) {
			docs = append(docs, doc)
		}
	}
}
