package helm

import (
	"bytes"
	"fmt"
	"maps"
	"slices"

	"sigs.k8s.io/kustomize/kyaml/kio"
	kyaml "sigs.k8s.io/kustomize/kyaml/yaml"
)

// Labels meshkeeper puts on the objects it manages.
const (
	LabelManagedBy = "app.kubernetes.io/managed-by"
	LabelComponent = "meshkeeper.dev/component"
	LabelRevision  = "meshkeeper.dev/revision"
	// ManagedByValue is the value of LabelManagedBy on pod templates.
	ManagedByValue = "meshkeeper"
	// AnnotationIgnore on a live object makes Repair leave it alone.
	AnnotationIgnore = "meshkeeper.dev/ignore"
)

// ManagedSelector selects every object meshkeeper renders (for watches):
// they all carry LabelComponent. It deliberately does not use
// LabelManagedBy: see ManagedLabels.
const ManagedSelector = LabelComponent

// Helm's own ownership metadata, set on every object it applies and required
// (label value "Helm") before it upgrades-adopts or uninstalls an object.
const (
	helmManagedByValue    = "Helm"
	helmReleaseNameAnno   = "meta.helm.sh/release-name"
	helmReleaseNSAnno     = "meta.helm.sh/release-namespace"
	postRenderFilenameKey = "postrenderer.helm.sh/postrender-filename"
)

// ManagedLabels returns the labels meshkeeper adds to every object of a
// component's release.
//
// On an object's own metadata, app.kubernetes.io/managed-by is Helm's: Helm
// v4 overwrites it with "Helm" when applying and refuses to uninstall or
// adopt objects that lack that value, so the post-renderer leaves it to Helm.
// Pod templates of workloads get all three labels, including
// managed-by=meshkeeper. Select meshkeeper's objects with ManagedSelector.
func ManagedLabels(component, revision string) map[string]string {
	return map[string]string{
		LabelManagedBy: ManagedByValue,
		LabelComponent: component,
		LabelRevision:  revision,
	}
}

// labelRenderer is a Helm post-renderer adding labels to every object's
// metadata.labels and to the pod templates of workloads.
type labelRenderer struct {
	labels map[string]string
}

// podTemplatePaths lists where workload kinds keep their pod (or job)
// template metadata.
var podTemplatePaths = map[string][][]string{
	"Deployment":            {{"spec", "template", "metadata", "labels"}},
	"DaemonSet":             {{"spec", "template", "metadata", "labels"}},
	"StatefulSet":           {{"spec", "template", "metadata", "labels"}},
	"ReplicaSet":            {{"spec", "template", "metadata", "labels"}},
	"ReplicationController": {{"spec", "template", "metadata", "labels"}},
	"Job":                   {{"spec", "template", "metadata", "labels"}},
	"CronJob": {
		{"spec", "jobTemplate", "metadata", "labels"},
		{"spec", "jobTemplate", "spec", "template", "metadata", "labels"},
	},
}

// Run implements postrenderer.PostRenderer. Helm hands it one stream of
// documents annotated with their source file, and splits the result by that
// annotation again, so annotations must survive (kyaml keeps them).
func (p *labelRenderer) Run(in *bytes.Buffer) (*bytes.Buffer, error) {
	if len(p.labels) == 0 {
		return in, nil
	}
	nodes, err := kio.ParseAll(in.String())
	if err != nil {
		return nil, fmt.Errorf("post-render: parse manifests: %w", err)
	}
	keys := slices.Sorted(maps.Keys(p.labels))
	for _, n := range nodes {
		if err := p.label(n, keys); err != nil {
			return nil, err
		}
	}
	out, err := kio.StringAll(nodes)
	if err != nil {
		return nil, fmt.Errorf("post-render: write manifests: %w", err)
	}
	return bytes.NewBufferString(out), nil
}

func (p *labelRenderer) label(n *kyaml.RNode, keys []string) error {
	kind := n.GetKind()
	for _, k := range keys {
		if k == LabelManagedBy {
			continue // Helm's on object metadata, see ManagedLabels
		}
		if err := n.PipeE(kyaml.SetLabel(k, p.labels[k])); err != nil {
			return fmt.Errorf("post-render: label %s %s: %w", kind, n.GetName(), err)
		}
	}
	for _, path := range podTemplatePaths[kind] {
		for _, k := range keys {
			if err := n.PipeE(kyaml.LookupCreate(kyaml.MappingNode, path...), kyaml.SetField(k, kyaml.NewStringRNode(p.labels[k]))); err != nil {
				return fmt.Errorf("post-render: label pod template of %s %s: %w", kind, n.GetName(), err)
			}
		}
	}
	return nil
}
