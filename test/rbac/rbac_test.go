// Package rbac checks the manager's RBAC (config/rbac, generated from the
// +kubebuilder:rbac markers) against what the bundles' charts really render:
// every bundle, every mode, every component. It fails when a rule grants a
// verb on a kind no chart renders (outside the manager's own short list
// below), when a rendered kind lacks a verb Helm needs, when a namespaced
// kind is granted cluster-wide, and when bind/escalate name anything but the
// components' roles.
package rbac

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"

	"github.com/meshkeeper/meshkeeper/internal/bundle"
	"github.com/meshkeeper/meshkeeper/internal/helm"
)

// componentsNamespace is where meshkeeper installs the components (the
// manager's --components-namespace default).
const componentsNamespace = "istio-system"

// own are the kinds the manager itself reads or writes, not a chart: each
// with the verbs it may hold and why. Anything else must be rendered.
var own = map[string]struct {
	verbs []string
	why   string
}{
	"meshkeeper.dev/meshes":            {[]string{"get", "list", "watch", "update", "patch"}, "reconciles Meshes; update/patch only for its finalizer"},
	"meshkeeper.dev/meshes/status":     {[]string{"get", "update", "patch"}, "writes status"},
	"meshkeeper.dev/meshes/finalizers": {[]string{"update"}, "owner references block deletion"},
	"meshkeeper.dev/meshnodes":         {[]string{"get", "list", "watch"}, "reads the node agents' preflight reports"},
	"/namespaces":                      {[]string{"get", "list", "watch", "patch", "create"}, "labels the selected namespaces; creates the components' namespace"},
	"/nodes":                           {[]string{"get", "list", "watch", "patch"}, "labels nodes with their redirection"},
	"events.k8s.io/events":             {[]string{"create", "patch"}, "events on the Mesh"},
	"/pods":                            {[]string{"get", "list", "watch", "create", "delete"}, "node waves replace node-component pods; ztunnel's new pod starts beside the old one (a surge pod)"},
	"apps/controllerrevisions":         {[]string{"get", "list", "watch"}, "node waves compare pod template revisions"},
	"/secrets":                         {[]string{"get", "list", "watch", "create", "update", "patch", "delete"}, "Helm release storage and the webhook certificate, in meshkeeper-system only"},
	"coordination.k8s.io/leases":       {[]string{"get", "list", "watch", "create", "update", "patch", "delete"}, "leader election, in meshkeeper-system only"},
	"admissionregistration.k8s.io/validatingwebhookconfigurations": {[]string{"get", "patch"}, "its own webhook's caBundle, by name"},
	"gateway.networking.k8s.io/gateways":                           {[]string{"get", "list", "create", "patch", "delete"}, "writes the waypoint Gateways of spec.waypoints in their namespaces (server-side apply: create and patch), deletes its own"},
	"security.istio.io/peerauthentications":                        {[]string{"get", "list", "create", "patch", "delete"}, "writes the mesh-wide STRICT PeerAuthentication of spec.security.mtls (server-side apply), deletes its own; lists the others to report conflicts and opt-outs"},
}

// ownNamespaced are the own kinds that must be in a Role of this namespace.
var ownNamespaced = map[string]string{
	"/pods":                      componentsNamespace,
	"apps/controllerrevisions":   componentsNamespace,
	"/secrets":                   "meshkeeper-system",
	"coordination.k8s.io/leases": "meshkeeper-system",
}

// relaySecret is the one Secret the manager writes in the components'
// namespace: the SPIRE admin API relay's certificates
// (internal/controller/mesh_spire_relay.go). It may create Secrets there
// (RBAC cannot limit create by name) and read, update and delete only that
// one; list and watch never.
const relaySecret = "spire-relay-tls"

// readAnywhere are rendered namespaced kinds the manager also reads (only
// reads) in every namespace, each with why.
var readAnywhere = map[string]string{
	"/serviceaccounts":            "SPIRE registration: one entry per service account of every meshed namespace (mesh_identity.go)",
	"policy/poddisruptionbudgets": "workload restarts of a mode switch are paced by the namespaces' PodDisruptionBudgets (internal/restart)",
}

// restartAnywhere are rendered namespaced kinds the manager also reads and
// patches (only get, list and patch) in every namespace: a mode switch
// restarts the moved namespaces' workloads by stamping their pod template
// (internal/restart, mesh_engine.go).
var restartAnywhere = map[string]string{
	"apps/deployments":  "workload restarts of a mode switch (internal/restart)",
	"apps/daemonsets":   "workload restarts of a mode switch (internal/restart)",
	"apps/statefulsets": "workload restarts of a mode switch (internal/restart)",
}

// helmVerbs are what Helm and drift repair need on a rendered kind.
var helmVerbs = []string{"get", "create", "update", "patch"}

type rendered struct {
	namespaced bool
	names      map[string]bool
	deletable  bool // CRDs are kept (helm.sh/resource-policy: keep)
}

// render collects every kind (as group/resource) the charts render, with
// the names of the roles among them.
func render(t *testing.T) map[string]*rendered {
	t.Helper()
	catalog := bundle.Default()
	modes := []bundle.Inputs{
		{Mode: "Ambient", Redirection: "EBPF", TrustDomain: "example.org", SVIDTTL: "12h0m0s", MaxUnavailable: "10%"},
		{Mode: "Ambient", Redirection: "IPTables", TrustDomain: "example.org"},
		{Mode: "Sidecar", TrustDomain: "example.org"},
		{Mode: "Ambient", Redirection: "EBPF", NodeWaves: true},
		{Mode: "Sidecar", TrustDomain: "example.org", SpireRelayImage: "ghcr.io/meshkeeper/manager:0.1.0"},
	}
	out := map[string]*rendered{}
	for _, v := range catalog.Versions() {
		b, err := catalog.Resolve(v)
		if err != nil {
			t.Fatal(err)
		}
		for _, in := range modes {
			in.Namespace = componentsNamespace
			for _, c := range bundle.Components(in.Mode, in.Redirection, true) {
				chart, err := b.Chart(c)
				if err != nil {
					t.Fatal(err)
				}
				objs, err := helm.Render(chart, string(c), componentsNamespace, b.Values(c, in), helm.ManagedLabels(string(c), b.Revision()))
				if err != nil {
					t.Fatalf("render %s %s: %v", v, c, err)
				}
				for _, o := range objs {
					gvk := o.GroupVersionKind()
					key := gvk.Group + "/" + plural(gvk.Kind)
					r := out[key]
					if r == nil {
						r = &rendered{names: map[string]bool{}, deletable: gvk.Kind != "CustomResourceDefinition"}
						out[key] = r
					}
					r.namespaced = o.GetNamespace() != ""
					if o.GetNamespace() != "" && o.GetNamespace() != componentsNamespace {
						t.Errorf("%s %s/%s of %s %s is outside %s", gvk.Kind, o.GetNamespace(), o.GetName(), v, c, componentsNamespace)
					}
					r.names[o.GetName()] = true
				}
			}
		}
	}
	return out
}

func plural(kind string) string {
	k := strings.ToLower(kind)
	switch {
	case strings.HasSuffix(k, "y"):
		return strings.TrimSuffix(k, "y") + "ies"
	case strings.HasSuffix(k, "s"):
		return k + "es"
	}
	return k + "s"
}

// grant is one (group/resource, namespace) with its verbs and resourceNames.
type grant struct {
	verbs map[string][]string // verb -> resourceNames (nil: any name)
}

func loadRBAC(t *testing.T, raw []byte) (cluster map[string]*grant, roles map[string]map[string]*grant) {
	t.Helper()
	add := func(into map[string]*grant, rules []rbacv1.PolicyRule) {
		for _, r := range rules {
			for _, g := range r.APIGroups {
				for _, res := range r.Resources {
					key := g + "/" + res
					if into[key] == nil {
						into[key] = &grant{verbs: map[string][]string{}}
					}
					for _, v := range r.Verbs {
						if len(r.ResourceNames) == 0 {
							into[key].verbs[v] = nil
						} else if names, ok := into[key].verbs[v]; !ok || names != nil {
							into[key].verbs[v] = append(names, r.ResourceNames...)
						}
					}
				}
			}
		}
	}
	cluster = map[string]*grant{}
	roles = map[string]map[string]*grant{}
	for _, doc := range bytes.Split(raw, []byte("\n---\n")) {
		if len(bytes.TrimSpace(bytes.TrimPrefix(bytes.TrimSpace(doc), []byte("---")))) == 0 {
			continue
		}
		var meta struct {
			Kind string `json:"kind"`
		}
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			t.Fatal(err)
		}
		switch meta.Kind {
		case "ClusterRole":
			var cr rbacv1.ClusterRole
			if err := yaml.UnmarshalStrict(doc, &cr); err != nil {
				t.Fatal(err)
			}
			add(cluster, cr.Rules)
		case "Role":
			var r rbacv1.Role
			if err := yaml.UnmarshalStrict(doc, &r); err != nil {
				t.Fatal(err)
			}
			if roles[r.Namespace] == nil {
				roles[r.Namespace] = map[string]*grant{}
			}
			add(roles[r.Namespace], r.Rules)
		default:
			t.Fatalf("config/rbac/role.yaml holds a %q", meta.Kind)
		}
	}
	return cluster, roles
}

func TestManagerRBACMatchesWhatTheChartsRender(t *testing.T) {
	kinds := render(t)
	raw, err := os.ReadFile(filepath.Join("..", "..", "config", "rbac", "role.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	cluster, roles := loadRBAC(t, raw)
	t.Logf("charts render %d kinds: %s", len(kinds), strings.Join(sortedKeys(kinds), ", "))
	for _, p := range problems(kinds, cluster, roles) {
		t.Error(p)
	}
}

// problems is every way the RBAC (cluster: the ClusterRole's grants, roles:
// each namespace's Role) differs from what the charts render (kinds).
func problems(kinds map[string]*rendered, cluster map[string]*grant, roles map[string]map[string]*grant) []string {
	var out []string
	errorf := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }
	check := func(where string, grants map[string]*grant, namespace string) {
		for key, g := range grants {
			r, isRendered := kinds[key]
			o, isOwn := own[key]
			switch {
			case isRendered && r.namespaced && namespace == "" && restartAnywhere[key] != "":
				for v := range g.verbs {
					if !slices.Contains([]string{"get", "list", "patch"}, v) {
						errorf("ClusterRole grants %q on %s: only get, list and patch may be cluster-wide (%s)", v, key, restartAnywhere[key])
					}
				}
			case isRendered && r.namespaced && namespace == "" && readAnywhere[key] != "":
				for v := range g.verbs {
					if !slices.Contains([]string{"get", "list", "watch"}, v) {
						errorf("ClusterRole grants %q on %s: only reads may be cluster-wide (%s)", v, key, readAnywhere[key])
					}
				}
			case isRendered:
				if r.namespaced && namespace == "" {
					errorf("ClusterRole grants %v on %s, which the charts render only in %s: grant it in a Role there", verbsOf(g), key, componentsNamespace)
				}
				if r.namespaced && namespace != componentsNamespace {
					errorf("%s grants %v on %s, which the charts render only in %s", where, verbsOf(g), key, componentsNamespace)
				}
				for v, names := range g.verbs {
					switch v {
					case "get", "list", "watch", "create", "update", "patch":
					case "delete":
						if !r.deletable {
							errorf("%s grants delete on %s, which meshkeeper keeps", where, key)
						}
					case "bind", "escalate":
						if names == nil {
							errorf("%s grants %s on every %s: limit it with resourceNames to the components' roles", where, v, key)
							continue
						}
						want := sortedKeys(r.names)
						sort.Strings(names)
						if !slices.Equal(names, want) {
							errorf("%s: %s on %s is limited to %v, the charts render %v: update the marker in internal/controller/rbac.go", where, v, key, names, want)
						}
					default:
						errorf("%s grants %q on %s: no chart needs it", where, v, key)
					}
				}
			case key == "/secrets" && namespace == componentsNamespace:
				for v, names := range g.verbs {
					switch {
					case v == "create":
					case slices.Contains([]string{"get", "update", "delete"}, v):
						if !slices.Equal(names, []string{relaySecret}) {
							errorf("%s grants %q on Secrets %v: only on %s (resourceNames)", where, v, names, relaySecret)
						}
					default:
						errorf("%s grants %q on Secrets: the manager only creates, reads, updates and deletes %s there", where, v, relaySecret)
					}
				}
			case isOwn:
				if ns, ok := ownNamespaced[key]; ok && ns != namespace {
					errorf("%s grants %v on %s: only a Role in %s may (%s)", where, verbsOf(g), key, ns, o.why)
				}
				for v := range g.verbs {
					if !slices.Contains(o.verbs, v) {
						errorf("%s grants %q on %s, beyond what meshkeeper needs (%v: %s)", where, v, key, o.verbs, o.why)
					}
				}
			default:
				errorf("%s grants %v on %s: no chart of any bundle renders it and the manager does not need it", where, verbsOf(g), key)
			}
		}
	}
	check("ClusterRole meshkeeper-manager", cluster, "")
	for ns, grants := range roles {
		check("Role "+ns+"/meshkeeper-manager", grants, ns)
	}

	// And nothing the charts render is missing.
	for key, r := range kinds {
		grants := cluster
		where := "ClusterRole meshkeeper-manager"
		if r.namespaced {
			grants, where = roles[componentsNamespace], "Role "+componentsNamespace+"/meshkeeper-manager"
		}
		g := grants[key]
		need := slices.Clone(helmVerbs)
		if r.deletable {
			need = append(need, "delete")
		}
		for _, v := range need {
			if g == nil {
				errorf("%s grants nothing on %s, which the charts render", where, key)
				break
			}
			if names, ok := g.verbs[v]; !ok || names != nil {
				errorf("%s lacks %q on every %s, which Helm needs", where, v, key)
			}
		}
	}
	if g := cluster["/secrets"]; g != nil {
		errorf("ClusterRole grants %v on Secrets cluster-wide", verbsOf(g))
	}
	sort.Strings(out)
	return out
}

func verbsOf(g *grant) []string {
	return sortedKeys(g.verbs)
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// The check above fails on the permissions issue 15 found in the old
// ClusterRole, and on each other kind of excess or lack: config/rbac with
// one grant added or removed must give the problem named.
func TestRBACCheckFindsEachExcessAndLack(t *testing.T) {
	kinds := render(t)
	raw, err := os.ReadFile(filepath.Join("..", "..", "config", "rbac", "role.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if cluster, roles := loadRBAC(t, raw); len(problems(kinds, cluster, roles)) != 0 {
		t.Fatalf("config/rbac has problems already: %v (see TestManagerRBACMatchesWhatTheChartsRender)", problems(kinds, cluster, roles))
	}
	const clusterRoles = "rbac.authorization.k8s.io/clusterroles"
	for _, tc := range []struct {
		name   string
		change func(cluster map[string]*grant, roles map[string]map[string]*grant)
		want   string
	}{
		{"escalate on every ClusterRole", func(c map[string]*grant, _ map[string]map[string]*grant) {
			c[clusterRoles].verbs["escalate"] = nil
		}, "grants escalate on every " + clusterRoles + ": limit it with resourceNames"},
		{"bind on one more ClusterRole than the charts render", func(c map[string]*grant, _ map[string]map[string]*grant) {
			c[clusterRoles].verbs["bind"] = append(slices.Clone(c[clusterRoles].verbs["bind"]), "cluster-admin")
		}, "bind on " + clusterRoles + " is limited to"},
		{"Secrets cluster-wide", func(c map[string]*grant, _ map[string]map[string]*grant) {
			c["/secrets"] = &grant{verbs: map[string][]string{"get": nil}}
		}, "ClusterRole grants [get] on Secrets cluster-wide"},
		{"pod delete everywhere", func(c map[string]*grant, _ map[string]map[string]*grant) {
			c["/pods"] = &grant{verbs: map[string][]string{"delete": nil}}
		}, "ClusterRole meshkeeper-manager grants [delete] on /pods: only a Role in istio-system may"},
		{"webhook configurations deleted wholesale", func(c map[string]*grant, _ map[string]map[string]*grant) {
			c["admissionregistration.k8s.io/validatingwebhookconfigurations"].verbs["deletecollection"] = nil
		}, `grants "deletecollection" on admissionregistration.k8s.io/validatingwebhookconfigurations`},
		{"a kind no chart renders", func(c map[string]*grant, _ map[string]map[string]*grant) {
			c["batch/jobs"] = &grant{verbs: map[string][]string{"create": nil}}
		}, "grants [create] on batch/jobs: no chart of any bundle renders it"},
		{"a verb no chart needs on a rendered kind", func(_ map[string]*grant, r map[string]map[string]*grant) {
			r[componentsNamespace]["apps/deployments"].verbs["deletecollection"] = nil
		}, `grants "deletecollection" on apps/deployments: no chart needs it`},
		{"a namespaced rendered kind cluster-wide", func(c map[string]*grant, _ map[string]map[string]*grant) {
			c["/configmaps"] = &grant{verbs: map[string][]string{"patch": nil}}
		}, "ClusterRole grants [patch] on /configmaps, which the charts render only in istio-system"},
		{"workloads deleted anywhere", func(c map[string]*grant, _ map[string]map[string]*grant) {
			c["apps/deployments"].verbs["delete"] = nil
		}, `ClusterRole grants "delete" on apps/deployments: only get, list and patch may be cluster-wide`},
		{"PodDisruptionBudgets written anywhere", func(c map[string]*grant, _ map[string]map[string]*grant) {
			c["policy/poddisruptionbudgets"].verbs["patch"] = nil
		}, `ClusterRole grants "patch" on policy/poddisruptionbudgets: only reads may be cluster-wide`},
		{"a verb Helm needs, missing", func(_ map[string]*grant, r map[string]map[string]*grant) {
			delete(r[componentsNamespace]["apps/deployments"].verbs, "patch")
		}, `lacks "patch" on every apps/deployments, which Helm needs`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cluster, roles := loadRBAC(t, raw)
			tc.change(cluster, roles)
			got := problems(kinds, cluster, roles)
			if !slices.ContainsFunc(got, func(p string) bool { return strings.Contains(p, tc.want) }) {
				t.Errorf("got problems %q, want one saying %q", got, tc.want)
			}
		})
	}
}
