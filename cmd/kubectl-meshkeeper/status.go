package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/analysis"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// status prints the Mesh and its rollout as a human reads it: what runs,
// the rollout's step and wave with the wave's nodes or namespaces, each SLO
// with its value and threshold, the plan, every node's redirection and
// node-component versions, and the history.
func status(ctx context.Context, c client.Client, o options, out io.Writer) error {
	mesh := &meshv1.Mesh{}
	if err := c.Get(ctx, client.ObjectKey{Name: o.mesh}, mesh); err != nil {
		return fmt.Errorf("get mesh/%s: %w", o.mesh, err)
	}
	st := mesh.Status
	ago := func(t *metav1.Time) string {
		if t == nil {
			return "-"
		}
		return fmt.Sprintf("%s (%s ago)", t.UTC().Format(time.RFC3339), o.now().Sub(t.Time).Round(time.Second))
	}
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	defer w.Flush() //nolint:errcheck // stdout

	mode := string(mesh.Spec.Dataplane.EffectiveMode())
	if mesh.Spec.Dataplane.EffectiveMode() == meshv1.ModeAmbient {
		mode += ", " + string(mesh.Spec.Dataplane.EffectiveRedirection())
	}
	fmt.Fprintf(w, "Mesh %s\t%s, spec.version %s, installed %s, target %s\n", mesh.Name, mode, mesh.Spec.Version, orDash(st.Version.Installed), orDash(st.Version.Target))
	for _, t := range []string{meshv1.ConditionReady, meshv1.ConditionStalled, meshv1.ConditionDegraded, meshv1.ConditionRolledBack} {
		if cond := meta.FindStatusCondition(st.Conditions, t); cond != nil {
			fmt.Fprintf(w, "%s\t%s (%s): %s\n", t, cond.Status, cond.Reason, cond.Message)
		}
	}
	if mesh.Status.ObservedGeneration != mesh.Generation {
		fmt.Fprintf(w, "\t(status is of generation %d; the spec is at %d: meshkeeper is still acting on it)\n", st.ObservedGeneration, mesh.Generation)
	}
	if cat := st.Catalog; cat != nil {
		src := "embedded only"
		if cat.Source != "" {
			src = fmt.Sprintf("%s, last checked %s", cat.Source, ago(cat.LastCheckedAt))
		}
		fmt.Fprintf(w, "Catalog\t%s\n", src)
		if cat.Message != "" {
			fmt.Fprintf(w, "\t%s\n", cat.Message)
		}
		var remote []string
		for _, b := range cat.Bundles {
			if b.From != bundle.SourceEmbedded {
				remote = append(remote, fmt.Sprintf("%s from %s", b.Version, b.From))
			}
		}
		if len(remote) > 0 {
			fmt.Fprintf(w, "\treleases from the source: %s\n", strings.Join(remote, "; "))
		}
	}

	fmt.Fprintln(w)
	if ro := st.Rollout; ro != nil {
		fmt.Fprintf(w, "Rollout\t%s → %s, started %s\n", ro.From, ro.To, ago(ro.StartedAt))
		wave := fmt.Sprintf("wave %d of %d", ro.Wave, ro.Waves)
		if ro.Wave == 0 {
			wave = fmt.Sprintf("no wave started yet (%d planned)", ro.Waves)
		}
		fmt.Fprintf(w, "Step\t%s, %s, since %s\n", ro.Step, wave, ago(ro.WaveStartedAt))
		if len(ro.WaveNodes) > 0 {
			fmt.Fprintf(w, "Wave nodes\t%s\n", strings.Join(ro.WaveNodes, ", "))
		}
		if len(ro.WaveNamespaces) > 0 {
			fmt.Fprintf(w, "Wave namespaces\t%s\n", strings.Join(ro.WaveNamespaces, ", "))
		}
		if ro.Message != "" {
			fmt.Fprintf(w, "Now\t%s\n", ro.Message)
		}
		settings := analysis.SettingsFor(mesh.Spec.Analysis)
		fmt.Fprintf(w, "Checks\tevery %s, %d failed (rollback after %d), %d inconclusive, last %s\n",
			settings.Interval, ro.FailedChecks, settings.FailureLimit, ro.InconclusiveChecks, ago(ro.LastCheckAt))
		fmt.Fprintln(w)
		fmt.Fprintln(w, "SLO\tVALUE\tTHRESHOLD\tVERDICT\tCHECKED")
		results := map[string]meshv1.AnalysisResult{}
		for _, a := range ro.Analysis {
			results[a.SLO] = a
		}
		for _, slo := range settings.SLOs {
			a, ok := results[slo.Name]
			value, verdict, at := "-", "not checked yet", "-"
			if ok {
				value, verdict, at = orDash(a.Value), string(a.Verdict), ago(&a.At)
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", slo.Name, value, threshold(slo), verdict, at)
		}
	} else {
		fmt.Fprintln(w, "Rollout\tnone in flight")
	}

	if len(st.Plan) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintln(w, "PLAN\tACTION\tTARGET\tSTATE\tMESSAGE")
		for i, s := range st.Plan {
			fmt.Fprintf(w, "%d.\t%s\t%s\t%s\t%s\n", i+1, s.Action, s.Target, s.State, s.Message)
		}
	}

	nodes, err := nodeRows(ctx, c, o.componentsNamespace)
	if err != nil {
		return err
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "NODE\tREDIRECTION\tNODE COMPONENTS")
	for _, n := range nodes {
		fmt.Fprintf(w, "%s\t%s\t%s\n", n.name, orDash(n.redirection), orDash(strings.Join(n.components, ", ")))
	}

	fmt.Fprintln(w)
	if len(st.History) == 0 {
		fmt.Fprintln(w, "History\tnone yet")
		return nil
	}
	fmt.Fprintln(w, "VERSION\tMODE\tOUTCOME\tSTARTED\tFINISHED\tREASON")
	for i := len(st.History) - 1; i >= 0; i-- { // newest first
		h := st.History[i]
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", h.Version, h.Mode, h.Outcome, stamp(h.StartedAt), stamp(h.FinishedAt), orDash(h.Reason))
	}
	return nil
}

// threshold says what passes, e.g. ">= 0.99" or "0.1 .. 0.5".
func threshold(slo meshv1.SLO) string {
	switch {
	case slo.Min != nil && slo.Max != nil:
		return fmt.Sprintf("%s .. %s", *slo.Min, *slo.Max)
	case slo.Min != nil:
		return ">= " + *slo.Min
	case slo.Max != nil:
		return "<= " + *slo.Max
	}
	return "-"
}

type nodeRow struct {
	name, redirection string
	components        []string
}

// nodeRows lists every node with meshkeeper's redirection label and the
// version of each node-component pod on it ("ztunnel 1.27.3").
func nodeRows(ctx context.Context, c client.Client, namespace string) ([]nodeRow, error) {
	var nodes corev1.NodeList
	if err := c.List(ctx, &nodes); err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	var pods corev1.PodList
	if err := c.List(ctx, &pods, client.InNamespace(namespace), client.HasLabels{meshv1.LabelComponent}); err != nil {
		return nil, fmt.Errorf("list pods in %s: %w", namespace, err)
	}
	byNode := map[string][]string{}
	for _, p := range pods.Items {
		comp := bundle.Component(p.Labels[meshv1.LabelComponent])
		if !comp.OnNodes() || p.Spec.NodeName == "" || p.DeletionTimestamp != nil {
			continue
		}
		v := strings.ReplaceAll(p.Labels[meshv1.LabelControlPlaneRevision], "-", ".")
		entry := fmt.Sprintf("%s %s", comp, orDash(v))
		if !podReady(&p) {
			entry += " (not ready)"
		}
		byNode[p.Spec.NodeName] = append(byNode[p.Spec.NodeName], entry)
	}
	rows := make([]nodeRow, 0, len(nodes.Items))
	for _, n := range nodes.Items {
		comps := byNode[n.Name]
		slices.Sort(comps)
		rows = append(rows, nodeRow{name: n.Name, redirection: n.Labels[meshv1.LabelRedirection], components: comps})
	}
	slices.SortFunc(rows, func(a, b nodeRow) int { return strings.Compare(a.name, b.name) })
	return rows, nil
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func stamp(t *metav1.Time) string {
	if t == nil {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
