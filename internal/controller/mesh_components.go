package controller

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/log"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/helm"
)

// releaseName is the Helm release of a component. The control plane gets one
// release per revision so two revisions can run side by side.
func releaseName(c bundle.Component, b *bundle.Bundle) string {
	if c == bundle.Istiod {
		return "istiod-" + b.Revision()
	}
	return string(c)
}

// inputsFor turns the Mesh spec into the bundle's chart inputs.
func inputsFor(mesh *meshv1.Mesh, namespace string) bundle.Inputs {
	in := bundle.Inputs{
		Mode:        string(mesh.Spec.Dataplane.EffectiveMode()),
		Redirection: string(mesh.Spec.Dataplane.EffectiveRedirection()),
		Namespace:   namespace,
	}
	if s := mesh.Spec.Identity.Spire; s != nil && s.Enabled {
		in.Spire = true
		in.TrustDomain = s.TrustDomain
		if s.SVIDTTL != nil {
			in.SVIDTTL = s.SVIDTTL.Duration.String()
		}
	}
	if mu := mesh.Spec.Rollout.Nodes.MaxUnavailable; mu != nil {
		in.MaxUnavailable = mu.String()
	}
	return in
}

func spireEnabled(mesh *meshv1.Mesh) bool {
	return mesh.Spec.Identity.Spire != nil && mesh.Spec.Identity.Spire.Enabled
}

// reconcileComponents installs or upgrades every component the mode needs,
// repairs drift, and reads their readiness. It never waits: workloads that
// are not ready yet requeue the Mesh.
func (r *MeshReconciler) reconcileComponents(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	b := obs.bundle
	in := inputsFor(mesh, r.ComponentsNamespace)
	in.NodeWaves = obs.rollout.nodeWaves
	relay := r.spireRelay()
	if relay != nil {
		in.SpireRelayImage = relay.Image
	}
	wanted := bundle.Components(in.Mode, in.Redirection, spireEnabled(mesh))
	previous := map[string]meshv1.ComponentStatus{}
	for _, c := range mesh.Status.Components {
		previous[c.Name] = c
	}
	var errs []error
	obs.componentsReady = true
	type item struct {
		b    *bundle.Bundle
		c    bundle.Component
		name string // status name
	}
	items := make([]item, 0, len(wanted)+1)
	if eo := obs.engine; eo != nil && eo.releases != nil {
		// The engine's decision lists every release, each at its bundle.
		in.ServeBoth = eo.serveBoth
		for _, rel := range eo.releases {
			rb, err := r.Catalog.Resolve(rel.Version)
			if err != nil {
				return fmt.Errorf("release %s: %w", rel, err)
			}
			name := string(rel.Component)
			if s := eo.decision.Step; rel.Component == bundle.Istiod && s != nil && rel.Version != s.Version {
				name = "istiod-previous" // the revision the hop leaves
			}
			items = append(items, item{rb, rel.Component, name})
		}
	} else {
		for _, c := range wanted {
			cb := b
			if obs.rollout.holdComponents && c != bundle.Istiod && c != bundle.CRDs {
				cb = obs.rollout.from // outside a window only the new control plane is installed
			}
			items = append(items, item{cb, c, string(c)})
		}
		if from := obs.rollout.from; from != nil {
			// The old revision keeps serving the namespaces not moved yet.
			items = append(items, item{from, bundle.Istiod, "istiod-previous"})
		}
	}
	for _, it := range items {
		if it.c == bundle.SpireServer && relay != nil && relay.ManageCerts {
			// The relay's certificates before the pod that mounts them.
			if err := r.ensureSpireRelayCerts(ctx, mesh, relay); err != nil {
				st := previous[it.name]
				st.Name, st.Ready, st.Message = it.name, false, err.Error()
				obs.components = append(obs.components, st)
				obs.componentsReady = false
				obs.wantedReleases = append(obs.wantedReleases, releaseName(it.c, it.b))
				errs = append(errs, err)
				continue
			}
		}
		if it.c == bundle.SpireAgent {
			if wait := r.spireAgentGate(ctx, findComponent(obs.components, string(bundle.SpireServer))); wait != "" {
				// Server first: the agents keep what they run until the
				// server is ready and its API answers.
				st := previous[it.name]
				st.Name, st.Ready, st.Message = it.name, false, wait
				obs.components = append(obs.components, st)
				obs.componentsReady = false
				obs.wantedReleases = append(obs.wantedReleases, releaseName(it.c, it.b))
				continue
			}
		}
		st := r.reconcileComponent(ctx, mesh, it.b, it.c, in, previous[it.name], obs)
		st.status.Name = it.name
		if st.err != nil {
			errs = append(errs, st.err)
		}
		obs.components = append(obs.components, st.status)
		obs.componentsReady = obs.componentsReady && st.status.Ready
		obs.wantedReleases = append(obs.wantedReleases, st.status.Release)
	}
	return errors.Join(errs...)
}

type componentResult struct {
	status meshv1.ComponentStatus
	err    error
}

func (r *MeshReconciler) reconcileComponent(ctx context.Context, mesh *meshv1.Mesh, b *bundle.Bundle, c bundle.Component,
	in bundle.Inputs, prev meshv1.ComponentStatus, obs *observation) componentResult {
	name := releaseName(c, b)
	res := componentResult{status: meshv1.ComponentStatus{Name: string(c), Release: name, Version: b.Version}}
	fail := func(what string, err error) componentResult {
		res.err = fmt.Errorf("%s %s: %w", what, name, err)
		res.status.Message = res.err.Error()
		return res
	}
	chart, err := b.Chart(c)
	if err != nil {
		return fail("load chart for", err)
	}
	st, err := r.Helm.Apply(ctx, helm.Release{
		Name:      name,
		Namespace: r.ComponentsNamespace,
		Chart:     chart,
		Values:    b.Values(c, in),
		Labels:    helm.ManagedLabels(string(c), b.Revision()),
	})
	if err != nil {
		return fail("apply", err)
	}
	res.status.Revision = int32(st.Revision)
	if prev.Revision != 0 && res.status.Revision != prev.Revision || prev.Version != b.Version {
		r.event(mesh, corev1.EventTypeNormal, "ComponentApplied", "Applied %s %s (release %s revision %d)", c, b.Version, name, st.Revision)
	}
	repair, err := r.Helm.Repair(ctx, name)
	if err != nil {
		return fail("repair drift of", err)
	}
	if len(repair.Repaired) > 0 {
		log.FromContext(ctx).Info("Repaired drift", "release", name, "objects", repair.Repaired)
		r.event(mesh, corev1.EventTypeWarning, "DriftRepaired", "Restored %s changed or deleted outside meshkeeper", strings.Join(repair.Repaired, ", "))
	}
	obs.ignored = append(obs.ignored, repair.Ignored...)
	ready, msg, err := r.Helm.Ready(ctx, name)
	if err != nil {
		return fail("read readiness of", err)
	}
	res.status.Ready, res.status.Message = ready, msg
	return res
}

// errWaiting marks a step that is under way and needs another reconcile,
// not a failure.
var errWaiting = errors.New("waiting")

// cleanNodeAgent puts the node-agent release into its cleanup phase (every
// node runs `agent uninstall`, removing each pinned program, map and link)
// and reports whether that phase has rolled out to every node. The node
// agent deliberately leaves its datapath attached when it stops (restarts and
// upgrades never drop redirection), so uninstalling the release without this
// phase would leave connects redirected to a capture port nobody serves.
func (r *MeshReconciler) cleanNodeAgent(ctx context.Context, mesh *meshv1.Mesh, b *bundle.Bundle) error {
	chart, err := b.Chart(bundle.NodeAgent)
	if err != nil {
		return fmt.Errorf("load node-agent chart: %w", err)
	}
	in := inputsFor(mesh, r.ComponentsNamespace)
	in.NodeAgentCleanup = true
	st, err := r.Helm.Apply(ctx, helm.Release{
		Name:      string(bundle.NodeAgent),
		Namespace: r.ComponentsNamespace,
		Chart:     chart,
		Values:    b.Values(bundle.NodeAgent, in),
		Labels:    helm.ManagedLabels(string(bundle.NodeAgent), b.Revision()),
	})
	if err != nil {
		return fmt.Errorf("start node-agent cleanup: %w", err)
	}
	ready, msg, err := r.Helm.Ready(ctx, string(bundle.NodeAgent))
	if err != nil {
		return fmt.Errorf("read node-agent cleanup: %w", err)
	}
	if !ready {
		log.FromContext(ctx).Info("Waiting for the node agent to remove its datapath from every node", "revision", st.Revision, "status", msg)
		return fmt.Errorf("%w for the node agent to remove its eBPF datapath from every node: %s", errWaiting, msg)
	}
	r.event(mesh, corev1.EventTypeNormal, "DatapathRemoved", "The node agent removed its eBPF programs and pins from every node")
	return nil
}

// uninstall removes one release; the node agent goes through its cleanup
// phase first.
func (r *MeshReconciler) uninstall(ctx context.Context, mesh *meshv1.Mesh, b *bundle.Bundle, name string, wait bool) error {
	if name == string(bundle.NodeAgent) {
		if err := r.cleanNodeAgent(ctx, mesh, b); err != nil {
			return err
		}
	}
	if err := r.Helm.Uninstall(ctx, name, wait); err != nil {
		return fmt.Errorf("uninstall %s: %w", name, err)
	}
	return nil
}

// cleanupBundle is the bundle whose charts remove components: the target's,
// else the installed version's, else the newest (charts are shared).
func (r *MeshReconciler) cleanupBundle(mesh *meshv1.Mesh) *bundle.Bundle {
	for _, v := range []string{mesh.Spec.Version, mesh.Status.Version.Installed} {
		if b, err := r.Catalog.Resolve(v); err == nil {
			return b
		}
	}
	versions := r.Catalog.Versions()
	b, _ := r.Catalog.Resolve(versions[len(versions)-1])
	return b
}

// retireComponents uninstalls releases the Mesh no longer needs (components of
// another mode, an old control-plane revision) once everything wanted is
// ready and the namespaces have moved, so traffic never loses its proxies.
func (r *MeshReconciler) retireComponents(ctx context.Context, mesh *meshv1.Mesh, obs *observation) error {
	if !obs.componentsReady || obs.applyErr != nil {
		return nil
	}
	releases, err := r.Helm.List(ctx)
	if err != nil {
		return fmt.Errorf("list releases: %w", err)
	}
	var errs []error
	for _, rel := range releases {
		if slices.Contains(obs.wantedReleases, rel.Name) {
			continue
		}
		if err := r.uninstall(ctx, mesh, obs.bundle, rel.Name, false); err != nil {
			errs = append(errs, err)
			continue
		}
		log.FromContext(ctx).Info("Uninstalled release no longer needed", "release", rel.Name)
		r.event(mesh, corev1.EventTypeNormal, "ComponentRemoved", "Uninstalled %s: not needed by %s mode at %s",
			rel.Name, mesh.Spec.Dataplane.EffectiveMode(), obs.bundle.Version)
	}
	obs.retired = len(errs) == 0
	return errors.Join(errs...)
}

// uninstallComponents removes every release, node components first.
func (r *MeshReconciler) uninstallComponents(ctx context.Context, mesh *meshv1.Mesh) error {
	releases, err := r.Helm.List(ctx)
	if err != nil {
		return fmt.Errorf("list releases: %w", err)
	}
	order := func(name string) int {
		for i, c := range bundle.Components(string(meshv1.ModeAmbient), string(meshv1.RedirectionEBPF), true) {
			if name == string(c) || (c == bundle.Istiod && strings.HasPrefix(name, "istiod-")) {
				return i
			}
		}
		return -1
	}
	slices.SortFunc(releases, func(a, b helm.Status) int { return order(b.Name) - order(a.Name) })
	b := r.cleanupBundle(mesh)
	var errs []error
	for _, rel := range releases {
		if err := r.uninstall(ctx, mesh, b, rel.Name, true); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// event records an event when a recorder is configured.
func (r *MeshReconciler) event(mesh *meshv1.Mesh, eventType, reason, format string, args ...any) {
	if r.Recorder != nil {
		r.Recorder.Eventf(mesh, nil, eventType, reason, "Reconcile", format, args...)
	}
}
