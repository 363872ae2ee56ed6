package bundle

import (
	"strconv"
	"time"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// Inputs are the Mesh's choices that shape the charts' values. Empty fields
// take the API's defaults.
type Inputs struct {
	// Mode is Ambient (default) or Sidecar.
	Mode string
	// Redirection is EBPF (default) or IPTables; Ambient only.
	Redirection string
	// Namespace every release is installed in. Charts name their own objects
	// in the release namespace; this is how one component finds another
	// (ztunnel → istiod, spire-agent → spire-server). Empty: each chart uses
	// its own release namespace.
	Namespace string
	// TrustDomain is the SPIFFE trust domain (spec.identity.spire.trustDomain);
	// empty means cluster.local.
	TrustDomain string
	// SVIDTTL is the workload certificate lifetime, a Go duration; empty
	// means 1h.
	SVIDTTL string
	// Spire is spec.identity.spire.enabled: in Sidecar mode, where the
	// bundle supports it, injected proxies take their SVIDs from SPIRE.
	Spire bool
	// SpireRelayImage, when set, runs the relay of the SPIRE server's admin
	// API (`manager spire-relay`, this image) beside spire-server, serving
	// mutual TLS with the certificates in the Secret spire-relay-tls.
	SpireRelayImage string
	// MaxUnavailable bounds node-component rollouts: a count ("2") or a
	// percentage ("10%"); empty means 10%.
	MaxUnavailable string
	// NodeAgentCleanup renders the node agent in its cleanup phase: every
	// node runs `agent uninstall`, then idles. Apply it and wait for the
	// DaemonSet to be ready before uninstalling the node-agent release
	// (bundles/README.md, "Removing the node agent").
	NodeAgentCleanup bool
	// NodeWaves makes the node components' DaemonSets OnDelete: the
	// operator replaces their pods node wave by node wave (the Nodes step
	// of a rollout). False keeps the native rolling update.
	NodeWaves bool
	// ServeBoth makes istiod serve both dataplanes while namespaces move
	// between them (a mode switch in waves): ambient for the namespaces not
	// moved yet and sidecar injection for those that have (the injector
	// skips namespaces labelled istio.io/dataplane-mode=ambient).
	ServeBoth bool
	// Overrides are merged last into a component's values, for development
	// and tests (e.g. spire-server persistence.enabled=false on a cluster
	// without a storage class).
	Overrides map[Component]map[string]any
}

const (
	defaultTrustDomain    = "cluster.local"
	defaultSVIDTTL        = "1h"
	defaultMaxUnavailable = "10%"
	minCATTL              = 24 * time.Hour
)

// Components lists the components a mesh needs, in install order: the CRDs,
// SPIRE (server before agents) when enabled, the control plane, then for
// Ambient the node components: ztunnel, the node agent for EBPF redirection,
// and istio-cni. istio-cni is always part of Ambient: its DaemonSet only
// lands on nodes labelled meshkeeper.dev/redirection=iptables, which are all
// nodes with IPTables redirection and the fallback nodes with EBPF.
// Sidecar mode has no node components. Empty mode and redirection mean
// Ambient and EBPF.
func Components(mode, redirection string, spire bool) []Component {
	out := []Component{CRDs}
	if spire {
		out = append(out, SpireServer, SpireAgent)
	}
	out = append(out, Istiod)
	if mode == string(meshv1.ModeSidecar) {
		return out
	}
	out = append(out, Ztunnel)
	if redirection != string(meshv1.RedirectionIPTables) {
		out = append(out, NodeAgent)
	}
	return append(out, CNI)
}

// Values returns the values of component c's release: what the bundle and
// the Mesh decide, then the bundle's per-release values, then in.Overrides.
// The chart's values.yaml supplies everything else (resources, ports, ...).
// The result is a fresh map the caller may keep or change.
func (b *Bundle) Values(c Component, in Inputs) map[string]any {
	ambient := in.Mode != string(meshv1.ModeSidecar)
	trustDomain := or(in.TrustDomain, defaultTrustDomain)
	v := map[string]any{
		"revision": b.Revision(),
		"version":  b.Version,
		"images":   b.images(c),
	}
	switch c {
	case CRDs:
	case Istiod:
		v["namespace"] = in.Namespace
		v["trustDomain"] = trustDomain
		v["ambient"] = map[string]any{"enabled": ambient || in.ServeBoth}
		v["injection"] = map[string]any{"enabled": !ambient || in.ServeBoth}
		if in.Spire && !ambient && b.SpireSupport[string(meshv1.ModeSidecar)] {
			v["spire"] = map[string]any{"enabled": true} // the chart's default is off
		}
	case Ztunnel:
		v["namespace"] = in.Namespace
		v["maxUnavailable"] = maxUnavailable(in.MaxUnavailable)
		v["nodeWaves"] = in.NodeWaves
		v["dnsCapture"] = b.DNSCapture
	case CNI:
		v["maxUnavailable"] = maxUnavailable(in.MaxUnavailable)
		v["nodeWaves"] = in.NodeWaves
		v["ambient"] = map[string]any{"dnsCapture": b.DNSCapture}
		v["nodeSelector"] = map[string]any{meshv1.LabelRedirection: string(meshv1.NodeRedirectionIPTables)}
	case NodeAgent:
		v["maxUnavailable"] = maxUnavailable(in.MaxUnavailable)
		v["nodeSelector"] = map[string]any{meshv1.LabelRedirection: string(meshv1.NodeRedirectionEBPF)}
		if in.NodeAgentCleanup {
			// Every node that may ever have run the agent, whatever its
			// redirection label says now: `agent uninstall` is idempotent.
			v["nodeSelector"] = map[string]any{"kubernetes.io/os": "linux"}
		}
		v["cleanup"] = in.NodeAgentCleanup
		v["nodeWaves"] = in.NodeWaves
		v["dnsCapture"] = b.DNSCapture
	case SpireServer:
		ttl := or(in.SVIDTTL, defaultSVIDTTL)
		v["spireVersion"] = b.SpireVersion
		v["trustDomain"] = trustDomain
		v["svidTTL"] = ttl
		v["caTTL"] = caTTL(ttl)
		if in.SpireRelayImage != "" {
			v["relay"] = map[string]any{"enabled": true}
			v["images"].(map[string]any)["spireRelay"] = in.SpireRelayImage
		}
	case SpireAgent:
		v["spireVersion"] = b.SpireVersion
		v["namespace"] = in.Namespace
		v["trustDomain"] = trustDomain
		v["maxUnavailable"] = maxUnavailable(in.MaxUnavailable)
	}
	mergeInto(v, b.values[c])
	mergeInto(v, in.Overrides[c])
	return v
}

func (b *Bundle) images(c Component) map[string]any {
	out := map[string]any{}
	for _, name := range componentImages[c] {
		out[name] = b.Images[name]
	}
	return out
}

// maxUnavailable keeps a count an integer, as the DaemonSet API's intstr
// reads it, and a percentage a string.
func maxUnavailable(s string) any {
	s = or(s, defaultMaxUnavailable)
	if n, err := strconv.Atoi(s); err == nil {
		return n
	}
	return s
}

// caTTL keeps the SPIRE CA at least 6 SVID lifetimes long (SPIRE's own
// guidance), and never under a day.
func caTTL(svidTTL string) string {
	d, err := time.ParseDuration(svidTTL)
	if err != nil || 6*d <= minCATTL {
		return minCATTL.String()
	}
	return (6 * d).String()
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// mergeInto deep-merges src into dst: maps merge key by key, anything else
// in src replaces dst's value. src is copied, never aliased.
func mergeInto(dst, src map[string]any) {
	for k, sv := range src {
		if sm, ok := sv.(map[string]any); ok {
			if dm, ok := dst[k].(map[string]any); ok {
				mergeInto(dm, sm)
				continue
			}
		}
		dst[k] = deepCopy(sv)
	}
}

func deepCopy(v any) any {
	switch t := v.(type) {
	case map[string]any:
		out := make(map[string]any, len(t))
		for k, e := range t {
			out[k] = deepCopy(e)
		}
		return out
	case []any:
		out := make([]any, len(t))
		for i, e := range t {
			out[i] = deepCopy(e)
		}
		return out
	default:
		return v
	}
}
