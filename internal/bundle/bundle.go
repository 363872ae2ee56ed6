// Package bundle is meshkeeper's catalog of mesh releases. A bundle is a
// tested set of chart and image versions that belong together: one manifest
// per release under bundles/catalog/ plus the project's own charts under
// bundles/charts/, shared by every release. The package resolves a Mesh's
// spec.version to a bundle and computes each component's Helm values; it
// never imports Helm and never talks to a cluster.
package bundle

import (
	"crypto/sha256"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strings"
)

// Component is one Helm release meshkeeper manages. Its value is also the
// name of its chart and of the meshkeeper.dev/component label.
type Component string

// The components, in install order (see Components).
const (
	CRDs        Component = "crds"
	SpireServer Component = "spire-server"
	SpireAgent  Component = "spire-agent"
	Istiod      Component = "istiod"
	Ztunnel     Component = "ztunnel"
	NodeAgent   Component = "node-agent"
	CNI         Component = "istio-cni"
)

// AllComponents lists every component in install order. Every bundle ships a
// chart for each.
var AllComponents = []Component{CRDs, SpireServer, SpireAgent, Istiod, Ztunnel, NodeAgent, CNI}

// OnNodes says c is a node component: a DaemonSet carrying traffic on every
// node (ztunnel, the node agent, istio-cni), moved node wave by node wave in
// a rollout. SPIRE's agent is identity, not a node component: it follows
// the SPIRE server.
func (c Component) OnNodes() bool {
	return c == Ztunnel || c == NodeAgent || c == CNI
}

// Image names a bundle's manifest must set under images:.
const (
	ImagePilot       = "pilot"
	ImageProxy       = "proxy"
	ImageZtunnel     = "ztunnel"
	ImageInstallCNI  = "installCNI"
	ImageNodeAgent   = "nodeAgent"
	ImagePause       = "pause"
	ImageSpireServer = "spireServer"
	ImageSpireAgent  = "spireAgent"
)

// componentImages is which images each component's chart runs.
var componentImages = map[Component][]string{
	CRDs:        nil,
	SpireServer: {ImageSpireServer},
	SpireAgent:  {ImageSpireAgent},
	Istiod:      {ImagePilot, ImageProxy},
	Ztunnel:     {ImageZtunnel},
	NodeAgent:   {ImageNodeAgent, ImagePause},
	CNI:         {ImageInstallCNI},
}

// Bundle is one mesh release: its versions, images and charts.
type Bundle struct {
	// Version is the Istio release, e.g. "1.28.2".
	Version string
	// Minor is Version's minor, e.g. "1.28".
	Minor string
	// MinKernel is the oldest kernel release ("5.10") the node agent's eBPF
	// redirection supports; older nodes fall back or are blocked.
	MinKernel string
	// UpgradeFrom lists the minors ("1.27") a mesh may run before moving to
	// this release.
	UpgradeFrom []string
	// SpireVersion is the SPIRE release of spire-server and spire-agent.
	SpireVersion string
	// SpireSupport says, per dataplane mode (Sidecar, Ambient), whether
	// this release's proxies can take their identities from SPIRE.
	SpireSupport map[string]bool
	// DNSCapture says ztunnel's DNS proxy is on (ztunnel's
	// ISTIO_META_DNS_CAPTURE) and pods' DNS, UDP and TCP port 53, is sent
	// to it on port 15053 in their netns: by the node agent's eBPF
	// datapath (--dns-capture) and by istio-cni on fallback nodes
	// (AMBIENT_DNS_CAPTURE). One field, so the three cannot disagree.
	DNSCapture bool
	// Images maps an image name (ImagePilot, ...) to its reference, a tag
	// and optionally a pinned digest.
	Images map[string]string
	// Source is where the bundle came from: SourceEmbedded, a bundles
	// directory, or the OCI reference@digest of a catalog artifact.
	Source string

	file   string
	semver semver
	charts map[Component]string         // chart directory under charts/
	values map[Component]map[string]any // per-release values from the manifest
	fsys   fs.FS
	digest func() (string, error)
}

// ztunnelDNSCaptureEnv is the proxy metadata ztunnel reads to run its DNS
// proxy (ztunnel's DNS_CAPTURE metadata, from ISTIO_META_* variables).
const ztunnelDNSCaptureEnv = "ISTIO_META_DNS_CAPTURE"

// SourceEmbedded is the Source of the bundles compiled into the binary.
const SourceEmbedded = "embedded"

// Digest is the sha256 of everything the bundle installs: its manifest and
// every file of the charts it names. Two bundles of one version with the
// same Digest are the same release.
func (b *Bundle) Digest() (string, error) {
	return b.digest()
}

func (b *Bundle) computeDigest() (string, error) {
	h := sha256.New()
	write := func(name string) error {
		raw, err := fs.ReadFile(b.fsys, name)
		if err != nil {
			return err
		}
		// Length-prefixed name and content: no two trees hash alike.
		fmt.Fprintf(h, "%d:%s%d:", len(name), name, len(raw))
		h.Write(raw)
		return nil
	}
	if err := write(b.file); err != nil {
		return "", fmt.Errorf("bundle %s: digest: %w", b.Version, err)
	}
	for _, c := range AllComponents {
		root := path.Join("charts", b.charts[c])
		err := fs.WalkDir(b.fsys, root, func(p string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			return write(p)
		})
		if err != nil {
			return "", fmt.Errorf("bundle %s: digest of chart %s: %w", b.Version, b.charts[c], err)
		}
	}
	return fmt.Sprintf("sha256:%x", h.Sum(nil)), nil
}

// Revision is the control-plane revision of this release: its version with
// dashes, usable in object names and label values ("1.28.2" → "1-28-2").
func (b *Bundle) Revision() string {
	return strings.ReplaceAll(b.Version, ".", "-")
}

// Chart returns the chart of component c as a file system rooted at the
// directory holding its Chart.yaml.
func (b *Bundle) Chart(c Component) (fs.FS, error) {
	dir, ok := b.charts[c]
	if !ok {
		return nil, fmt.Errorf("bundle %s: no chart for component %q; components: %s", b.Version, c, joinComponents(AllComponents))
	}
	sub, err := fs.Sub(b.fsys, path.Join("charts", dir))
	if err != nil {
		return nil, fmt.Errorf("bundle %s: chart %s: %w", b.Version, dir, err)
	}
	return sub, nil
}

// CanUpgradeFrom says whether a mesh running version (exact or a minor) may
// move to this bundle in one step.
func (b *Bundle) CanUpgradeFrom(version string) bool {
	v, err := parseVersion(version)
	if err != nil {
		return false
	}
	if v.minorString() == b.Minor {
		return !v.hasPatch || v.patch <= b.semver.patch
	}
	return v.compareMinor(b.semver) < 0 && slices.Contains(b.UpgradeFrom, v.minorString())
}

func joinComponents(cs []Component) string {
	s := make([]string, len(cs))
	for i, c := range cs {
		s[i] = string(c)
	}
	return strings.Join(s, ", ")
}

// Values of a catalog manifest's spire.support.<mode>.
const (
	SpireSupported   = "Supported"
	SpireUnsupported = "Unsupported"
)
