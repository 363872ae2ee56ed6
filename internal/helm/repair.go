package helm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"

	"github.com/fluxcd/cli-utils/pkg/kstatus/status"
	rcommon "helm.sh/helm/v4/pkg/release/common"
	releasev1 "helm.sh/helm/v4/pkg/release/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
)

// RepairResult lists objects by "Kind/namespace/name" ("Kind/name" when
// cluster-scoped).
type RepairResult struct {
	// Repaired objects were missing or had drifted and were re-applied.
	Repaired []string
	// Ignored objects carry meshkeeper.dev/ignore: "true" and were left as
	// they are, drifted or not.
	Ignored []string
}

// Repair restores the objects of the deployed revision without making a new
// Helm revision. For every object in the revision's manifest: if it is
// missing, or a server-side apply dry run of the manifest object differs
// from the live object (ignoring status, managedFields, resourceVersion and
// generation), the object is applied again with server-side apply, under
// Helm's own field manager (FieldManager) and with forced conflicts, so
// later upgrades own the same fields. Live objects annotated
// meshkeeper.dev/ignore: "true" are skipped and reported.
//
// Drift is judged on the fields the manifest sets: a field someone added
// (and that the chart does not set) is not drift; a changed or removed
// field the chart sets is.
//
// The newest revision must be deployed: repairing against an older one
// while an upgrade failed or is under way would undo part of it.
func (c *Client) Repair(ctx context.Context, name string) (RepairResult, error) {
	var res RepairResult
	defer c.lock(name)()
	rel, err := last(c.config(""), name)
	if err != nil {
		return res, fmt.Errorf("repair %s: %w", name, err)
	}
	if rel == nil {
		return res, fmt.Errorf("repair %s: %w", name, errNotFound)
	}
	if rel.Info.Status != rcommon.StatusDeployed {
		return res, fmt.Errorf("repair %s: newest revision %d is %s, not deployed: apply the release first", name, rel.Version, rel.Info.Status)
	}
	objs, err := c.releaseObjects(rel)
	if err != nil {
		return res, fmt.Errorf("repair %s: %w", name, err)
	}
	log := c.log.WithValues("release", name, "revision", rel.Version)

	// at is what c.verified remembers of an object found free of drift.
	at := func(o *unstructured.Unstructured) string {
		return fmt.Sprintf("%d/%s", rel.Version, o.GetResourceVersion())
	}
	var errs []error
	nsChecked := false
	for _, m := range objs {
		setHelmMetadata(m.obj, rel.Name, rel.Namespace)
		ri := c.resourceClient(m)
		key := name + "/" + m.key()
		live, err := ri.Get(ctx, m.obj.GetName(), metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			if m.namespaced && !nsChecked {
				if err := c.ensureNamespace(ctx, rel.Namespace); err != nil {
					errs = append(errs, err)
					continue
				}
				nsChecked = true
			}
			created, err := c.apply(ctx, ri, m.obj, false)
			if err != nil {
				errs = append(errs, fmt.Errorf("re-create %s: %w", m.key(), err))
				continue
			}
			c.verified.Store(key, at(created))
			log.Info("Repaired missing object", "object", m.key())
			res.Repaired = append(res.Repaired, m.key())
			continue
		case err != nil:
			errs = append(errs, fmt.Errorf("get %s: %w", m.key(), err))
			continue
		}
		if live.GetAnnotations()[AnnotationIgnore] == "true" {
			log.V(1).Info("Object ignored by annotation", "object", m.key(), "annotation", AnnotationIgnore)
			res.Ignored = append(res.Ignored, m.key())
			continue
		}
		if v, ok := c.verified.Load(key); ok && v == at(live) {
			continue // unchanged since it was last found free of drift
		}
		dry, err := c.apply(ctx, ri, m.obj, true)
		if err != nil {
			errs = append(errs, fmt.Errorf("dry-run apply %s: %w", m.key(), err))
			continue
		}
		if diff := drift(live, dry); diff == "" {
			c.verified.Store(key, at(live))
			continue
		} else {
			log.V(1).Info("Object drifted", "object", m.key(), "fields", diff)
		}
		applied, err := c.apply(ctx, ri, m.obj, false)
		if err != nil {
			errs = append(errs, fmt.Errorf("re-apply %s: %w", m.key(), err))
			continue
		}
		c.verified.Store(key, at(applied))
		log.Info("Repaired drifted object", "object", m.key())
		res.Repaired = append(res.Repaired, m.key())
	}
	if err := errors.Join(errs...); err != nil {
		return res, fmt.Errorf("repair %s: %w", name, err)
	}
	return res, nil
}

// releaseObjects parses and maps the manifest of a revision.
func (c *Client) releaseObjects(rel *releasev1.Release) ([]mapped, error) {
	objs, err := parseManifest(rel.Manifest)
	if err != nil {
		return nil, fmt.Errorf("revision %d: %w", rel.Version, err)
	}
	ms, err := mapObjects(c.getter.mapper, objs, rel.Namespace)
	if err != nil {
		return ms, fmt.Errorf("revision %d: %w", rel.Version, err)
	}
	return ms, nil
}

func (c *Client) resourceClient(m mapped) dynamic.ResourceInterface {
	if m.namespaced {
		return c.dynamic.Resource(m.resource).Namespace(m.obj.GetNamespace())
	}
	return c.dynamic.Resource(m.resource)
}

// apply server-side applies obj the way Helm does (whole object, Helm's
// field manager, strict field validation), forcing conflicts.
func (c *Client) apply(ctx context.Context, ri dynamic.ResourceInterface, obj *unstructured.Unstructured, dryRun bool) (*unstructured.Unstructured, error) {
	data, err := json.Marshal(obj.Object)
	if err != nil {
		return nil, err
	}
	opts := metav1.PatchOptions{FieldManager: FieldManager, Force: new(true), FieldValidation: "Strict"}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	return ri.Patch(ctx, obj.GetName(), types.ApplyPatchType, data, opts)
}

// drift compares a live object with the result of a dry-run apply and
// returns the top-level fields (metadata subfields) that differ, or "".
func drift(live, applied *unstructured.Unstructured) string {
	a, b := normalise(live), normalise(applied)
	var diff []string
	for k := range union(a, b) {
		if k == "metadata" {
			am, _ := a[k].(map[string]any)
			bm, _ := b[k].(map[string]any)
			for mk := range union(am, bm) {
				if !reflect.DeepEqual(am[mk], bm[mk]) {
					diff = append(diff, "metadata."+mk)
				}
			}
			continue
		}
		if !reflect.DeepEqual(a[k], b[k]) {
			diff = append(diff, k)
		}
	}
	return strings.Join(diff, ",")
}

func normalise(u *unstructured.Unstructured) map[string]any {
	o := runtime.DeepCopyJSON(u.Object)
	delete(o, "status")
	if md, ok := o["metadata"].(map[string]any); ok {
		for _, k := range []string{"managedFields", "resourceVersion", "generation"} {
			delete(md, k)
		}
	}
	return o
}

func union[V any](a, b map[string]V) map[string]struct{} {
	out := make(map[string]struct{}, len(a)+len(b))
	for k := range a {
		out[k] = struct{}{}
	}
	for k := range b {
		out[k] = struct{}{}
	}
	return out
}

// Ready reports whether every object of the newest revision is ready now
// (kstatus Current: Deployments available and rolled out, DaemonSets
// scheduled and ready on every node, ...), without waiting. When not, the
// message names the first object that is not and why. A missing release is
// not ready, without error.
func (c *Client) Ready(ctx context.Context, name string) (bool, string, error) {
	rel, err := last(c.config(""), name)
	if err != nil {
		return false, "", fmt.Errorf("ready %s: %w", name, err)
	}
	if rel == nil {
		return false, fmt.Sprintf("release %s not found", name), nil
	}
	if rel.Info.Status.IsPending() {
		return false, fmt.Sprintf("release %s revision %d is %s", name, rel.Version, rel.Info.Status), nil
	}
	objs, err := c.releaseObjects(rel)
	if err != nil {
		return false, "", fmt.Errorf("ready %s: %w", name, err)
	}
	var notReady []string
	for _, m := range objs {
		live, err := c.resourceClient(m).Get(ctx, m.obj.GetName(), metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			notReady = append(notReady, m.key()+": not found")
			continue
		}
		if err != nil {
			return false, "", fmt.Errorf("ready %s: get %s: %w", name, m.key(), err)
		}
		if ok, msg, handled := onDeleteDaemonSetReady(live); handled {
			if !ok {
				notReady = append(notReady, fmt.Sprintf("%s: %s", m.key(), msg))
			}
			continue
		}
		st, err := status.Compute(live)
		if err != nil {
			return false, "", fmt.Errorf("ready %s: status of %s: %w", name, m.key(), err)
		}
		if st.Status != status.CurrentStatus {
			notReady = append(notReady, fmt.Sprintf("%s: %s: %s", m.key(), st.Status, st.Message))
		}
	}
	switch len(notReady) {
	case 0:
		return true, fmt.Sprintf("all %d objects of revision %d are ready", len(objs), rel.Version), nil
	case 1:
		return false, notReady[0], nil
	default:
		return false, fmt.Sprintf("%s (and %d more not ready)", notReady[0], len(notReady)-1), nil
	}
}

// onDeleteDaemonSetReady judges a DaemonSet with the OnDelete update
// strategy, which kstatus would report InProgress until every pod runs the
// newest template. Under OnDelete the caller replaces pods itself (node
// waves), so which template a pod runs is the caller's business: the
// DaemonSet is ready once the controller has seen its spec and a pod is
// available on every node that should run one. handled is false for any
// other object.
func onDeleteDaemonSetReady(u *unstructured.Unstructured) (ok bool, msg string, handled bool) {
	if u.GroupVersionKind().GroupKind().String() != "DaemonSet.apps" {
		return false, "", false
	}
	if t, _, _ := unstructured.NestedString(u.Object, "spec", "updateStrategy", "type"); t != "OnDelete" {
		return false, "", false
	}
	num := func(field string) int64 {
		n, _, _ := unstructured.NestedInt64(u.Object, "status", field)
		return n
	}
	switch desired := num("desiredNumberScheduled"); {
	case num("observedGeneration") < u.GetGeneration():
		return false, "OnDelete: the DaemonSet controller has not seen the latest spec yet", true
	case num("numberAvailable") < desired:
		return false, fmt.Sprintf("OnDelete: %d of %d pods available", num("numberAvailable"), desired), true
	case num("currentNumberScheduled") < desired:
		return false, fmt.Sprintf("OnDelete: %d of %d pods scheduled", num("currentNumberScheduled"), desired), true
	}
	return true, "", true
}
