// Package gatewayapi installs the Gateway API CRDs waypoints need: the
// standard channel's real schemas, as the sigs.k8s.io/gateway-api module
// ships them (bundles/gateway-api), and never over a newer copy. The CRDs
// are cluster-wide and often installed by someone else (a cloud provider, an
// ingress controller's chart, a platform team), so the rule is the one the
// Gateway API project gives implementations: compare the
// gateway.networking.k8s.io/bundle-version annotation; upgrade an older copy,
// leave a newer (or an experimental-channel) one as it is and say so.
package gatewayapi

import (
	"context"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strings"
	"sync"

	"golang.org/x/mod/semver"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/gateway-api/pkg/consts"
	"sigs.k8s.io/yaml"

	"github.com/meshkeeper/meshkeeper/bundles"
)

// BundleVersion is the Gateway API release meshkeeper ships, e.g. v1.6.0.
const BundleVersion = consts.BundleVersion

// Channel is the release channel meshkeeper ships.
const Channel = "standard"

// Label marks the CRDs meshkeeper installed or upgraded (the value of
// meshkeeper.dev/component).
const Label = "gateway-api"

// CRDs are the embedded CRDs, sorted by name: copies the caller may change.
func CRDs() ([]*unstructured.Unstructured, error) {
	crds, err := embedded()
	if err != nil {
		return nil, err
	}
	out := make([]*unstructured.Unstructured, len(crds))
	for i, u := range crds {
		out[i] = u.DeepCopy()
	}
	return out, nil
}

// embedded parses the embedded CRDs once; Ensure runs every reconcile, and
// parsing their YAML was ~5% of the manager's CPU on a 500-node cluster
// (test/scale). Callers must not change what it returns.
var embedded = sync.OnceValues(parseCRDs)

func parseCRDs() ([]*unstructured.Unstructured, error) {
	var out []*unstructured.Unstructured
	err := fs.WalkDir(bundles.GatewayAPI, "gateway-api", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || path.Ext(p) != ".yaml" {
			return err
		}
		raw, err := fs.ReadFile(bundles.GatewayAPI, p)
		if err != nil {
			return err
		}
		u := &unstructured.Unstructured{}
		if err := yaml.Unmarshal(raw, &u.Object); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if u.GetKind() != "CustomResourceDefinition" {
			return fmt.Errorf("%s: a %s, not a CustomResourceDefinition", p, u.GetKind())
		}
		out = append(out, u)
		return nil
	})
	slices.SortFunc(out, func(a, b *unstructured.Unstructured) int { return strings.Compare(a.GetName(), b.GetName()) })
	return out, err
}

// Action is what Ensure did with one CRD.
type Action string

const (
	// Installed: the CRD was missing and meshkeeper created it.
	Installed Action = "Installed"
	// Upgraded: the cluster had an older copy; meshkeeper replaced it.
	Upgraded Action = "Upgraded"
	// Current: the cluster has this version from meshkeeper; nothing to do.
	Current Action = "Current"
	// Present: someone else installed this very version; it is used as is
	// and not written to.
	Present Action = "Present"
	// Kept: the cluster has a copy meshkeeper must not overwrite (newer,
	// experimental channel, or of unknown version); it is left as it is.
	Kept Action = "Kept"
)

// Result is the outcome for one CRD.
type Result struct {
	Name   string
	Action Action
	// Found is the bundle version the cluster had ("" when none or unknown).
	Found string
	// Reason says why a Kept CRD was left, e.g. "v1.7.0 is newer than v1.6.0".
	Reason string
}

// Decide says what to do with one CRD given the copy in the cluster (nil:
// none). It is pure, for table tests.
func Decide(existing *apiextensionsv1.CustomResourceDefinition) Result {
	if existing == nil {
		return Result{Action: Installed}
	}
	name := existing.Name
	found := existing.Annotations[consts.BundleVersionAnnotation]
	channel := existing.Annotations[consts.ChannelAnnotation]
	switch {
	case found == "" || !semver.IsValid(found):
		return Result{Name: name, Action: Kept, Found: found,
			Reason: fmt.Sprintf("no valid %s annotation, so its version is unknown", consts.BundleVersionAnnotation)}
	case channel != "" && channel != Channel:
		// The experimental channel is a superset: replacing it with the
		// standard schema would drop fields users may rely on.
		return Result{Name: name, Action: Kept, Found: found,
			Reason: fmt.Sprintf("%s from the %s channel; meshkeeper ships %s from the %s channel", found, channel, BundleVersion, Channel)}
	}
	switch c := semver.Compare(found, BundleVersion); {
	case c > 0:
		return Result{Name: name, Action: Kept, Found: found, Reason: fmt.Sprintf("%s is newer than %s", found, BundleVersion)}
	case c < 0:
		return Result{Name: name, Action: Upgraded, Found: found}
	case existing.Labels[ownerLabel] != Label:
		return Result{Name: name, Action: Present, Found: found}
	default:
		return Result{Name: name, Action: Current, Found: found}
	}
}

// ownerLabel carries Label on the CRDs meshkeeper wrote
// (meshkeeper.dev/component; api/v1alpha1 is not imported here).
const ownerLabel = "meshkeeper.dev/component"

// Ensure installs every CRD that is missing and upgrades those older than
// BundleVersion, with server-side apply under
// fieldManager, labelled meshkeeper.dev/component=gateway-api; it leaves the
// others and reports them as Kept or Present.
func Ensure(ctx context.Context, c client.Client, fieldManager string) ([]Result, error) {
	crds, err := embedded() // read only: Apply gets a copy
	if err != nil {
		return nil, fmt.Errorf("read the embedded Gateway API CRDs: %w", err)
	}
	results := make([]Result, 0, len(crds))
	for _, want := range crds {
		existing, err := crdMetadata(ctx, c, want.GetName())
		if err != nil {
			return results, err
		}
		res := Decide(existing)
		res.Name = want.GetName()
		if res.Action == Installed || res.Action == Upgraded {
			obj := want.DeepCopy()
			l := obj.GetLabels()
			if l == nil {
				l = map[string]string{}
			}
			l[ownerLabel] = Label
			obj.SetLabels(l)
			// Force: an older copy's fields belong to whoever installed it
			// (Helm, kubectl); upgrading means taking them over.
			if err := c.Apply(ctx, client.ApplyConfigurationFromUnstructured(obj), client.FieldOwner(fieldManager), client.ForceOwnership); err != nil {
				return results, fmt.Errorf("apply CRD %s (%s): %w", res.Name, BundleVersion, err)
			}
		}
		results = append(results, res)
	}
	return results, nil
}

// Established reports whether every CRD Ensure just installed or upgraded
// is served; a Gateway written before that fails with "no matches for
// kind". (The others were in the cluster already.)
func Established(ctx context.Context, c client.Reader, results []Result) (bool, error) {
	for _, r := range results {
		if r.Action != Installed && r.Action != Upgraded {
			continue
		}
		crd, err := getCRD(ctx, c, r.Name)
		if err != nil || crd == nil {
			return false, err
		}
		ok := false
		for _, cond := range crd.Status.Conditions {
			if cond.Type == apiextensionsv1.Established && cond.Status == apiextensionsv1.ConditionTrue {
				ok = true
			}
		}
		if !ok {
			return false, nil
		}
	}
	return true, nil
}

// crdMetadata reads only a CRD's metadata (what Decide needs; a CRD can be
// hundreds of KiB), nil when there is none.
func crdMetadata(ctx context.Context, c client.Reader, name string) (*apiextensionsv1.CustomResourceDefinition, error) {
	m := &metav1.PartialObjectMetadata{}
	m.SetGroupVersionKind(apiextensionsv1.SchemeGroupVersion.WithKind("CustomResourceDefinition"))
	switch err := c.Get(ctx, client.ObjectKey{Name: name}, m); {
	case apierrors.IsNotFound(err):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("read CRD %s: %w", name, err)
	}
	return &apiextensionsv1.CustomResourceDefinition{ObjectMeta: m.ObjectMeta}, nil
}

// getCRD reads a CRD as unstructured (the caller's scheme need not know
// apiextensions), nil when there is none.
func getCRD(ctx context.Context, c client.Reader, name string) (*apiextensionsv1.CustomResourceDefinition, error) {
	u := &unstructured.Unstructured{}
	u.SetGroupVersionKind(apiextensionsv1.SchemeGroupVersion.WithKind("CustomResourceDefinition"))
	switch err := c.Get(ctx, client.ObjectKey{Name: name}, u); {
	case apierrors.IsNotFound(err):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("read CRD %s: %w", name, err)
	}
	crd := &apiextensionsv1.CustomResourceDefinition{}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, crd); err != nil {
		return nil, fmt.Errorf("read CRD %s: %w", name, err)
	}
	return crd, nil
}
