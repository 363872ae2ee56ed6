package helm

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// parseManifest decodes a multi-document YAML manifest (Helm's release
// manifest or rendered output) into objects, flattening List kinds and
// skipping empty documents.
func parseManifest(manifest string) ([]*unstructured.Unstructured, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(manifest)))
	var out []*unstructured.Unstructured
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read manifest: %w", err)
		}
		data, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return nil, fmt.Errorf("decode manifest: %w", err)
		}
		if len(bytes.TrimSpace(data)) == 0 || bytes.Equal(bytes.TrimSpace(data), []byte("null")) {
			continue
		}
		// Unstructured's decoder keeps integers as int64 (encoding/json
		// would make them float64).
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(data); err != nil {
			return nil, fmt.Errorf("decode manifest document: %w", err)
		}
		if u.IsList() {
			list, err := u.ToList()
			if err != nil {
				return nil, fmt.Errorf("decode %s: %w", u.GetKind(), err)
			}
			for i := range list.Items {
				out = append(out, &list.Items[i])
			}
			continue
		}
		out = append(out, u)
	}
}

// setHelmMetadata adds the ownership metadata Helm puts on every object it
// applies (setMetadataVisitor in Helm's action package). Applying an object
// without it under Helm's field manager would remove it, and Helm then
// refuses to upgrade-adopt or uninstall the object.
func setHelmMetadata(u *unstructured.Unstructured, release, namespace string) {
	labels := u.GetLabels()
	if labels == nil {
		labels = map[string]string{}
	}
	labels[LabelManagedBy] = helmManagedByValue
	u.SetLabels(labels)
	annos := u.GetAnnotations()
	if annos == nil {
		annos = map[string]string{}
	}
	annos[helmReleaseNameAnno] = release
	annos[helmReleaseNSAnno] = namespace
	u.SetAnnotations(annos)
}

// mapped is a manifest object with its REST mapping.
type mapped struct {
	obj      *unstructured.Unstructured
	resource schema.GroupVersionResource
	// namespaced objects get the release namespace when they have none.
	namespaced bool
}

func (m mapped) key() string { return objectKey(m.obj) }

// objectKey is "Kind/namespace/name", or "Kind/name" for cluster-scoped
// objects.
func objectKey(u *unstructured.Unstructured) string {
	if ns := u.GetNamespace(); ns != "" {
		return u.GetKind() + "/" + ns + "/" + u.GetName()
	}
	return u.GetKind() + "/" + u.GetName()
}

// mapObjects resolves each object's resource and defaults the namespace of
// namespaced objects, as Helm's builder does.
func mapObjects(mapper meta.RESTMapper, objs []*unstructured.Unstructured, namespace string) ([]mapped, error) {
	out := make([]mapped, 0, len(objs))
	var errs []error
	for _, u := range objs {
		gvk := u.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", objectKey(u), err))
			continue
		}
		namespaced := m.Scope.Name() == meta.RESTScopeNameNamespace
		if namespaced && u.GetNamespace() == "" {
			u.SetNamespace(namespace)
		}
		if !namespaced {
			u.SetNamespace("")
		}
		out = append(out, mapped{obj: u, resource: m.Resource, namespaced: namespaced})
	}
	return out, errors.Join(errs...)
}
