package helm

import (
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"

	"helm.sh/helm/v4/pkg/action"
	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/storage"
	"helm.sh/helm/v4/pkg/storage/driver"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// RenderKubeVersion is the Kubernetes version Render tells templates
// (.Capabilities.KubeVersion). Helm's own offline default is derived from
// the client-go version, except in test binaries, where it is v1.20.
var RenderKubeVersion = "v1.37.0"

// clusterScopedKinds are the built-in kinds without a namespace, for Render,
// which has no API server to ask. Kinds of CRDs in the chart's crds/ are
// looked up in those CRDs.
var clusterScopedKinds = map[string]bool{
	"Namespace": true, "Node": true, "PersistentVolume": true,
	"ClusterRole": true, "ClusterRoleBinding": true,
	"CustomResourceDefinition": true, "APIService": true,
	"MutatingWebhookConfiguration": true, "ValidatingWebhookConfiguration": true,
	"ValidatingAdmissionPolicy": true, "ValidatingAdmissionPolicyBinding": true,
	"MutatingAdmissionPolicy": true, "MutatingAdmissionPolicyBinding": true,
	"PriorityClass": true, "StorageClass": true, "CSIDriver": true, "CSINode": true,
	"VolumeAttachment": true, "RuntimeClass": true, "IngressClass": true,
	"GatewayClass": true, "FlowSchema": true, "PriorityLevelConfiguration": true,
	"CertificateSigningRequest": true, "DeviceClass": true,
}

// Render renders a chart offline (no cluster) the way Apply would install
// it: the chart's CRDs (crds/, unlabelled, as Helm installs them) first,
// then the templates post-rendered with labels and carrying Helm's ownership
// metadata, namespaced objects defaulted to namespace. Hooks are not
// included. For tests and dry runs (for example a server-side dry-run apply
// of every object).
func Render(chart fs.FS, name, namespace string, values map[string]any, labels map[string]string) ([]*unstructured.Unstructured, error) {
	ch, _, err := loadChart(chart)
	if err != nil {
		return nil, fmt.Errorf("render %s: %w", name, err)
	}
	kv, err := common.ParseKubeVersion(RenderKubeVersion)
	if err != nil {
		return nil, fmt.Errorf("render %s: kube version %q: %w", name, RenderKubeVersion, err)
	}
	discard := slog.New(slog.NewTextHandler(io.Discard, nil)).Handler()
	mem := driver.NewMemory()
	mem.SetNamespace(namespace)
	cfg := action.NewConfiguration(action.ConfigurationSetLogger(discard))
	cfg.Releases = storage.Init(mem)

	in := action.NewInstall(cfg)
	in.DryRunStrategy = action.DryRunClient
	in.ReleaseName = name
	in.Namespace = namespace
	in.KubeVersion = kv
	in.PostRenderer = &labelRenderer{labels: maps.Clone(labels)}
	res, err := in.Run(ch, copyValues(values))
	if err != nil {
		return nil, fmt.Errorf("render %s: %w", name, err)
	}
	rel, err := asV1(res)
	if err != nil {
		return nil, fmt.Errorf("render %s: %w", name, err)
	}

	var out []*unstructured.Unstructured
	clusterScoped := maps.Clone(clusterScopedKinds)
	for _, crd := range ch.CRDObjects() {
		objs, err := parseManifest(string(crd.File.Data))
		if err != nil {
			return nil, fmt.Errorf("render %s: %s: %w", name, crd.Filename, err)
		}
		for _, o := range objs {
			if o.GetKind() == "CustomResourceDefinition" {
				scope, _, _ := unstructured.NestedString(o.Object, "spec", "scope")
				kind, _, _ := unstructured.NestedString(o.Object, "spec", "names", "kind")
				if scope == "Cluster" {
					clusterScoped[kind] = true
				}
			}
		}
		out = append(out, objs...)
	}
	objs, err := parseManifest(rel.Manifest)
	if err != nil {
		return nil, fmt.Errorf("render %s: %w", name, err)
	}
	for _, o := range objs {
		if !clusterScoped[o.GetKind()] && o.GetNamespace() == "" {
			o.SetNamespace(namespace)
		}
		setHelmMetadata(o, name, namespace)
		out = append(out, o)
	}
	return out, nil
}
