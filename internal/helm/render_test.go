package helm

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	rcommon "helm.sh/helm/v4/pkg/release/common"
	releasev1 "helm.sh/helm/v4/pkg/release/v1"
)

var demoChart = os.DirFS("testdata/charts/demo")

func byKey(objs []*unstructured.Unstructured) map[string]*unstructured.Unstructured {
	m := map[string]*unstructured.Unstructured{}
	for _, o := range objs {
		m[objectKey(o)] = o
	}
	return m
}

func TestRenderOffline(t *testing.T) {
	labels := ManagedLabels("demo", "1-27-3")
	objs, err := Render(demoChart, "r1", "apps", map[string]any{"replicas": 3, "data": map[string]any{"greeting": "hi"}}, labels)
	if err != nil {
		t.Fatalf("Render: %v", err)
	}
	got := byKey(objs)
	want := []string{"ConfigMap/apps/r1-settings", "ConfigMap/apps/r1-tunables", "Deployment/apps/r1-web", "DaemonSet/apps/r1-agent"}
	if len(objs) != len(want) {
		t.Errorf("rendered %d objects, want %d: %v", len(objs), len(want), keys(got))
	}
	for _, k := range want {
		o := got[k]
		if o == nil {
			t.Fatalf("missing %s in %v", k, keys(got))
		}
		l := o.GetLabels()
		if l[LabelComponent] != "demo" || l[LabelRevision] != "1-27-3" {
			t.Errorf("%s labels %v lack the managed labels", k, l)
		}
		// Helm's ownership metadata, as Helm sets it when applying.
		if l[LabelManagedBy] != "Helm" || o.GetAnnotations()[helmReleaseNameAnno] != "r1" || o.GetAnnotations()[helmReleaseNSAnno] != "apps" {
			t.Errorf("%s lacks Helm's ownership metadata: labels %v annotations %v", k, l, o.GetAnnotations())
		}
		if _, ok := o.GetAnnotations()[postRenderFilenameKey]; ok {
			t.Errorf("%s still carries the post-render filename annotation", k)
		}
	}
	for _, k := range []string{"Deployment/apps/r1-web", "DaemonSet/apps/r1-agent"} {
		tl, _, _ := unstructured.NestedStringMap(got[k].Object, "spec", "template", "metadata", "labels")
		for lk, lv := range labels {
			if tl[lk] != lv {
				t.Errorf("%s pod template label %s=%q, want %q (all: %v)", k, lk, tl[lk], lv, tl)
			}
		}
		if tl["app.kubernetes.io/component"] == "" {
			t.Errorf("%s pod template lost the chart's own labels: %v", k, tl)
		}
	}
	if r, _, _ := unstructured.NestedInt64(got["Deployment/apps/r1-web"].Object, "spec", "replicas"); r != 3 {
		t.Errorf("replicas %d, want 3 from values", r)
	}
	if d, _, _ := unstructured.NestedString(got["ConfigMap/apps/r1-settings"].Object, "data", "greeting"); d != "hi" {
		t.Errorf("settings greeting %q, want hi", d)
	}
}

func keys(m map[string]*unstructured.Unstructured) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestLabelRendererQuotesAndKeepsAnnotations(t *testing.T) {
	in := bytes.NewBufferString(`apiVersion: batch/v1
kind: CronJob
metadata:
  name: c
  annotations:
    postrenderer.helm.sh/postrender-filename: demo/templates/cron.yaml
spec:
  schedule: "* * * * *"
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{name: x, image: y}]
---
apiVersion: v1
kind: Service
metadata:
  name: s
`)
	out, err := (&labelRenderer{labels: map[string]string{"flag": "true", "num": "1", LabelManagedBy: ManagedByValue}}).Run(in)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := parseManifest(out.String())
	if err != nil {
		t.Fatalf("parse %s: %v", out, err)
	}
	if len(objs) != 2 {
		t.Fatalf("%d objects, want 2:\n%s", len(objs), out)
	}
	cron := objs[0]
	if cron.GetLabels()["flag"] != "true" || cron.GetLabels()["num"] != "1" {
		t.Errorf("labels not strings: %v\n%s", cron.GetLabels(), out)
	}
	if _, ok := cron.GetLabels()[LabelManagedBy]; ok {
		t.Errorf("object metadata got %s, which is Helm's", LabelManagedBy)
	}
	if cron.GetAnnotations()[postRenderFilenameKey] == "" {
		t.Errorf("filename annotation lost:\n%s", out)
	}
	for _, path := range [][]string{{"spec", "jobTemplate", "metadata", "labels"}, {"spec", "jobTemplate", "spec", "template", "metadata", "labels"}} {
		l, _, err := unstructured.NestedStringMap(cron.Object, path...)
		if err != nil || l["flag"] != "true" || l[LabelManagedBy] != ManagedByValue {
			t.Errorf("%s: %v (%v)", strings.Join(path, "."), l, err)
		}
	}
	if objs[1].GetLabels()["flag"] != "true" {
		t.Errorf("service labels %v", objs[1].GetLabels())
	}
}

func TestDigests(t *testing.T) {
	a, err := valuesDigest(map[string]any{"a": 1, "b": map[string]any{"x": "y", "z": []any{1, 2}}}, map[string]string{"l": "1"}, "ns")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := valuesDigest(map[string]any{"b": map[string]any{"z": []any{1, 2}, "x": "y"}, "a": 1}, map[string]string{"l": "1"}, "ns")
	if a != b {
		t.Errorf("digest depends on map order: %s != %s", a, b)
	}
	for name, other := range map[string]func() (string, error){
		"values": func() (string, error) { return valuesDigest(map[string]any{"a": 2}, map[string]string{"l": "1"}, "ns") },
		"labels": func() (string, error) { return valuesDigest(map[string]any{"a": 1}, map[string]string{"l": "2"}, "ns") },
		"namespace": func() (string, error) {
			return valuesDigest(map[string]any{"a": 1}, map[string]string{"l": "1"}, "other")
		},
	} {
		d, _ := other()
		if d == a {
			t.Errorf("changing %s does not change the digest", name)
		}
	}
	if len(a) > 63 {
		t.Errorf("digest %q does not fit a label value", a)
	}
	_, c1, err := loadChart(demoChart)
	if err != nil {
		t.Fatal(err)
	}
	_, c2, _ := loadChart(demoChart)
	if c1 != c2 || c1 == "" {
		t.Errorf("chart digest unstable: %q %q", c1, c2)
	}
}

func TestLoadChartHonoursHelmignore(t *testing.T) {
	ch, _, err := loadChart(demoChart)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range ch.Raw {
		if strings.HasSuffix(f.Name, ".md") {
			t.Errorf("%s loaded despite .helmignore", f.Name)
		}
	}
	if ch.Metadata.Name != "demo" || len(ch.Templates) != 5 {
		t.Errorf("chart %s with %d templates, want demo with 5", ch.Metadata.Name, len(ch.Templates))
	}
	if _, _, err := loadChart(os.DirFS("testdata")); err == nil {
		t.Error("a directory without Chart.yaml loaded")
	}
}

func TestRollbackTarget(t *testing.T) {
	rev := func(v int, s rcommon.Status) *releasev1.Release {
		return &releasev1.Release{Version: v, Info: &releasev1.Info{Status: s}}
	}
	for _, tc := range []struct {
		name string
		h    []*releasev1.Release
		to   int
		want int // 0: error
	}{
		{"previous of deployed", []*releasev1.Release{rev(1, rcommon.StatusSuperseded), rev(2, rcommon.StatusDeployed)}, 0, 1},
		{"skips failed revisions", []*releasev1.Release{rev(1, rcommon.StatusSuperseded), rev(2, rcommon.StatusFailed), rev(3, rcommon.StatusDeployed)}, 0, 1},
		{"failed upgrade goes back to deployed", []*releasev1.Release{rev(1, rcommon.StatusSuperseded), rev(2, rcommon.StatusDeployed), rev(3, rcommon.StatusFailed)}, 0, 2},
		{"nothing before", []*releasev1.Release{rev(1, rcommon.StatusDeployed)}, 0, 0},
		{"explicit", []*releasev1.Release{rev(1, rcommon.StatusSuperseded), rev(2, rcommon.StatusFailed), rev(3, rcommon.StatusDeployed)}, 2, 2},
		{"explicit missing", []*releasev1.Release{rev(4, rcommon.StatusDeployed)}, 2, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := rollbackTarget(tc.h, tc.to)
			switch {
			case tc.want == 0 && err == nil:
				t.Errorf("got revision %d, want an error", got.Version)
			case tc.want != 0 && err != nil:
				t.Errorf("error %v, want revision %d", err, tc.want)
			case tc.want != 0 && got.Version != tc.want:
				t.Errorf("revision %d, want %d", got.Version, tc.want)
			}
		})
	}
}
