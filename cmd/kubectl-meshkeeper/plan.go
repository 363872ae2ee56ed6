package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/plan"
	"github.com/meshkeeper/meshkeeper/webhooks"
)

// planFailed is a spec the operator would refuse or could not plan: the
// command exits 2, so a CI job can gate a merge on it.
type planFailed struct{ msg string }

func (e *planFailed) Error() string { return e.msg }

// planFile is the dry run: the spec of the file against the live Mesh's
// status (what is installed, its history) and the cluster's nodes and
// namespaces, through the operator's own planner. It writes nothing.
func planFile(ctx context.Context, c client.Client, o options, cat *bundle.Catalog, out io.Writer) error {
	raw, err := os.ReadFile(o.file)
	if err != nil {
		return err
	}
	var want meshv1.Mesh
	if err := yaml.UnmarshalStrict(raw, &want); err != nil {
		return &planFailed{fmt.Sprintf("%s: %v", o.file, err)}
	}
	if want.Kind != "Mesh" || !strings.HasPrefix(want.APIVersion, meshv1.GroupVersion.Group+"/") {
		return &planFailed{fmt.Sprintf("%s: kind %q apiVersion %q: want a %s Mesh", o.file, want.Kind, want.APIVersion, meshv1.GroupVersion)}
	}
	name := want.Name
	if name == "" {
		name = o.mesh
	}

	live := &meshv1.Mesh{}
	exists := true
	if err := c.Get(ctx, client.ObjectKey{Name: name}, live); apierrors.IsNotFound(err) {
		exists = false
	} else if err != nil {
		return fmt.Errorf("get mesh/%s: %w", name, err)
	}
	fmt.Fprintf(out, "Plan for %s against the live cluster", o.file)
	if exists {
		fmt.Fprintf(out, " (mesh/%s: installed %s)\n", name, orDash(live.Status.Version.Installed))
	} else {
		fmt.Fprintf(out, " (no mesh/%s yet: a fresh install)\n", name)
	}

	if errs := webhooks.ValidateSpec(&want.Spec); len(errs) > 0 {
		return &planFailed{"the operator would refuse this spec: " + errs.ToAggregate().Error()}
	}
	if errs := webhooks.ValidateGates(&want.Spec); len(errs) > 0 {
		return &planFailed{"admission would refuse this spec: " + errs.ToAggregate().Error()}
	}
	if exists {
		if err := webhooks.ValidateDowngrade(want.Spec.Version, live.Status.Version.Installed); err != nil &&
			want.Spec.Upgrade.EffectiveMinor() != meshv1.UpgradeAutomatic {
			return &planFailed{"the operator would refuse this spec: " + err.Error()}
		}
	}

	namespaces, err := selected(ctx, c, want.Spec.Namespaces.Selector)
	if err != nil {
		return err
	}
	var nodes corev1.NodeList
	if err := c.List(ctx, &nodes); err != nil {
		return fmt.Errorf("list nodes: %w", err)
	}
	infos := make([]plan.NodeInfo, 0, len(nodes.Items))
	for _, n := range nodes.Items {
		infos = append(infos, plan.NodeInfo{Name: n.Name, Labels: n.Labels})
	}
	in := plan.Inputs{Spec: want.Spec, Namespaces: namespaces, Nodes: infos, Catalog: cat, Now: o.now()}
	if exists {
		in.Installed = plan.InstalledFrom(live.Status)
		in.History = live.Status.History
		in.ObservedGeneration = live.Status.ObservedGeneration
		in.Generation = live.Generation
		if !equalSpec(live.Spec, want.Spec) {
			in.Generation++ // applying a changed spec makes a new generation
		}
	}
	p, err := plan.Compute(in)
	if err != nil {
		return &planFailed{"no plan: " + err.Error()}
	}
	printPlan(out, p, len(namespaces), len(nodes.Items))
	if exists && live.Status.Catalog != nil {
		var missing []string
		for _, b := range live.Status.Catalog.Bundles {
			if _, err := cat.Resolve(b.Version); err != nil {
				missing = append(missing, b.Version)
			}
		}
		if len(missing) > 0 {
			fmt.Fprintf(out, "\nNote: the operator's catalog also has %s (from %s); pass --catalog-source to plan against it.\n",
				strings.Join(missing, ", "), live.Status.Catalog.Source)
		}
	}
	fmt.Fprintln(out, "\nNothing was applied.")
	return nil
}

func printPlan(out io.Writer, p plan.Plan, namespaces, nodes int) {
	fmt.Fprintf(out, "%s\n", p.Summary)
	fmt.Fprintf(out, "Target %s", p.Target)
	if len(p.Hops) > 1 {
		fmt.Fprintf(out, ", through %s (one minor at a time)", strings.Join(p.Hops, " → "))
	}
	if p.Automatic {
		fmt.Fprint(out, "; chosen by spec.upgrade (a newer release than the installed one that spec.version allows)")
	}
	fmt.Fprintf(out, "; %d namespaces selected, %d nodes\n", namespaces, nodes)
	switch {
	case p.Window.Next.IsZero():
		fmt.Fprintln(out, "Maintenance window: none configured, waves may start at any time")
	case p.Window.Open:
		fmt.Fprintf(out, "Maintenance window: open until %s\n", p.Window.Next.UTC().Format(time.RFC3339))
	default:
		fmt.Fprintf(out, "Maintenance window: closed, opens %s\n", p.Window.Next.UTC().Format(time.RFC3339))
	}
	if p.Paused {
		fmt.Fprintln(out, "spec.paused: true: the operator would publish this plan and run nothing")
	}
	if p.Blocked != "" {
		fmt.Fprintf(out, "Blocked: %s\n", p.Blocked)
		return
	}
	if len(p.Steps) == 0 {
		fmt.Fprintln(out, "Nothing to do: the cluster already runs this spec.")
		return
	}
	fmt.Fprintln(out)
	for i, s := range p.Steps {
		when := ""
		if ok, why := p.MayStart(i); !ok && s.Windowed {
			when = " [" + why + "]"
		} else if s.Windowed {
			when = " [inside a maintenance window]"
		}
		fmt.Fprintf(out, "%2d. %s %s%s\n    %s\n", i+1, s.Action, s.Target, when, s.Message)
		for w, nodes := range s.NodeWaves {
			fmt.Fprintf(out, "    node wave %d: %s\n", w+1, strings.Join(nodes, ", "))
		}
		for w, nss := range s.NamespaceWaves {
			fmt.Fprintf(out, "    namespace wave %d: %s\n", w+1, strings.Join(nss, ", "))
		}
	}
}

// selected are the namespaces a selector picks, as the operator reads them.
func selected(ctx context.Context, c client.Client, sel *metav1.LabelSelector) ([]string, error) {
	if sel == nil {
		return []string{}, nil
	}
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		return nil, &planFailed{fmt.Sprintf("spec.namespaces.selector: %v", err)}
	}
	var list corev1.NamespaceList
	if err := c.List(ctx, &list); err != nil {
		return nil, fmt.Errorf("list namespaces: %w", err)
	}
	names := []string{}
	for _, ns := range list.Items {
		if ns.DeletionTimestamp == nil && s.Matches(labels.Set(ns.Labels)) {
			names = append(names, ns.Name)
		}
	}
	slices.Sort(names)
	return names, nil
}

func equalSpec(a, b meshv1.MeshSpec) bool {
	ra, _ := yaml.Marshal(a)
	rb, _ := yaml.Marshal(b)
	return string(ra) == string(rb)
}
