package plan

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// minorVersion is the MAJOR.MINOR of a version; skew and hops are counted in
// minors within one major.
type minorVersion struct {
	major, minor int
	patch        bool // the version had a patch ("1.28.2", not "1.28")
}

var versionRE = regexp.MustCompile(`^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})(\.(0|[1-9][0-9]{0,8}))?$`)

func parseMinor(s string) (minorVersion, error) {
	m := versionRE.FindStringSubmatch(s)
	if m == nil {
		return minorVersion{}, fmt.Errorf(`%q is not a version: want a release like "1.28.2" or a minor like "1.28"`, s)
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	return minorVersion{major: major, minor: minor, patch: m[3] != ""}, nil
}

func (v minorVersion) String() string { return fmt.Sprintf("%d.%d", v.major, v.minor) }

// minorsAhead is how many minors a is ahead of b (negative when behind), and
// false when they are of different majors: meshkeeper has no skew rules
// across a major version.
func minorsAhead(a, b minorVersion) (int, bool) {
	if a.major != b.major {
		return 0, false
	}
	return a.minor - b.minor, true
}

// revisionOf is the control-plane revision of a version, as
// bundle.Bundle.Revision computes it ("1.28.2" → "1-28-2"), for versions that
// may no longer be in the catalog (the one being retired).
func revisionOf(version string) string {
	return strings.ReplaceAll(version, ".", "-")
}

// CheckSkew checks a proposed state of the mesh against the control-plane
// skew rule: the control plane (the newest istiod revision running) is never
// more than one minor ahead of the node components (ztunnel, istio-cni and
// the node agent), and the node components are never ahead of the control
// plane that configures them. An empty version means the component is not
// installed; node components without a control plane are refused too.
func CheckSkew(controlPlane, nodeComponents string) error {
	if nodeComponents == "" {
		return nil
	}
	if controlPlane == "" {
		return fmt.Errorf("node components (ztunnel, istio-cni, node agent) at %s would run without a control plane: install the control plane first", nodeComponents)
	}
	cp, err := parseMinor(controlPlane)
	if err != nil {
		return fmt.Errorf("control plane version: %w", err)
	}
	nodes, err := parseMinor(nodeComponents)
	if err != nil {
		return fmt.Errorf("node components version: %w", err)
	}
	ahead, ok := minorsAhead(cp, nodes)
	switch {
	case !ok:
		return fmt.Errorf("control plane %s and node components %s are of different major versions: meshkeeper moves one minor at a time within a major and has no skew rules across majors", controlPlane, nodeComponents)
	case ahead > 1:
		return fmt.Errorf("control plane %s would be %d minors ahead of the node components (ztunnel, istio-cni, node agent) at %s: it may be at most one minor ahead; move the node components to %d.%d first",
			controlPlane, ahead, nodeComponents, cp.major, cp.minor-1)
	case ahead < 0:
		return fmt.Errorf("node components (ztunnel, istio-cni, node agent) at %s would be ahead of the control plane at %s: upgrade the control plane first, then the node components",
			nodeComponents, controlPlane)
	}
	return nil
}

// CheckSpireSkew checks a proposed state of SPIRE (SPIRE release versions,
// not mesh versions): the server moves before the agents, so agents are never
// newer than the server, and the server is at most one minor ahead of them.
// An empty version means not installed; agents without a server are refused.
func CheckSpireSkew(server, agents string) error {
	if agents == "" {
		return nil
	}
	if server == "" {
		return fmt.Errorf("SPIRE agents %s would run without a SPIRE server: install the server first", agents)
	}
	s, err := parseMinor(server)
	if err != nil {
		return fmt.Errorf("SPIRE server version: %w", err)
	}
	a, err := parseMinor(agents)
	if err != nil {
		return fmt.Errorf("SPIRE agents version: %w", err)
	}
	ahead, ok := minorsAhead(s, a)
	switch {
	case !ok:
		return fmt.Errorf("SPIRE server %s and agents %s are of different major versions: SPIRE agents may only be one minor behind the server", server, agents)
	case ahead > 1:
		return fmt.Errorf("SPIRE server %s would be %d minors ahead of the SPIRE agents at %s: SPIRE supports agents at most one minor behind the server; ship a bundle with an intermediate SPIRE release",
			server, ahead, agents)
	case ahead < 0:
		return fmt.Errorf("SPIRE agents %s would be newer than the SPIRE server %s: upgrade the server first, then the agents", agents, server)
	}
	return nil
}

// Target is what spec.version resolves to for a mesh running installed.
type Target struct {
	// Bundle is the release to run.
	*bundle.Bundle
	// Automatic is true when the upgrade policy chose it, not spec.version:
	// the installed release already satisfies spec.version and Bundle is a
	// newer patch (upgrade.automatic) or the next minor (upgrade.minor:
	// Automatic) that the catalog offers. Such an upgrade starts only inside
	// a maintenance window, the control plane included.
	Automatic bool
}

// ResolveTarget is the release spec.version asks for, given what runs and the
// catalog:
//
//   - an exact version is that release;
//   - a minor follows its newest patch in the catalog (upgrade.automatic,
//     the default); with automatic: false a mesh already on that minor stays
//     on its installed release;
//   - with upgrade.minor: Automatic, spec.version is the oldest minor to
//     run: a mesh on that minor or a newer one moves to the newest patch of
//     the next minor once the catalog has one that upgrades from the
//     installed release (one minor at a time; each a full rollout), else
//     follows the newest patch of the minor it runs.
func ResolveTarget(spec *meshv1.MeshSpec, installed string, cat *bundle.Catalog) (Target, error) {
	b, err := cat.Resolve(spec.Version)
	if err != nil {
		return Target{}, err
	}
	want, err := parseMinor(spec.Version)
	have, errHave := parseMinor(installed)
	if err != nil || want.patch || installed == "" || errHave != nil || !have.patch {
		return Target{Bundle: b}, nil
	}
	ahead, sameMajor := minorsAhead(have, want)
	if !sameMajor || ahead < 0 {
		return Target{Bundle: b}, nil // spec.version asks for a newer minor: not automatic
	}
	if !spec.Upgrade.EffectiveAutomatic() {
		if ib, err := cat.Resolve(installed); err == nil && ahead == 0 {
			return Target{Bundle: ib}, nil
		}
		return Target{Bundle: b}, nil
	}
	if spec.Upgrade.EffectiveMinor() == meshv1.UpgradeAutomatic {
		next := fmt.Sprintf("%d.%d", have.major, have.minor+1)
		if nb, err := cat.Resolve(next); err == nil && nb.CanUpgradeFrom(installed) {
			return Target{Bundle: nb, Automatic: true}, nil
		}
		if ahead > 0 {
			// On a newer minor than spec.version: follow its patches.
			if hb, err := cat.Resolve(have.String()); err == nil {
				return Target{Bundle: hb, Automatic: hb.Version != installed}, nil
			}
		}
	}
	if ahead > 0 {
		return Target{Bundle: b}, nil
	}
	return Target{Bundle: b, Automatic: b.Version != installed}, nil
}

// upgradePath is the bundles the mesh moves through from installed to
// target, one minor at a time: the newest patch of every minor in between,
// then target. Each bundle must accept the version before it (upgradeFrom).
// Empty when installed is target.
func upgradePath(installed string, target *bundle.Bundle, cat *bundle.Catalog) ([]*bundle.Bundle, error) {
	if installed == target.Version {
		return nil, nil
	}
	from, err := parseMinor(installed)
	if err != nil || !from.patch {
		return nil, fmt.Errorf("status.version.installed %q is not a release (want MAJOR.MINOR.PATCH, e.g. 1.27.3): the installed version cannot be planned from; it is written by meshkeeper, check that nothing else edits the Mesh status", installed)
	}
	to, _ := parseMinor(target.Version) // a catalog release always parses
	ahead, ok := minorsAhead(to, from)
	switch {
	case !ok:
		return nil, fmt.Errorf("spec.version %s: moving from installed %s crosses a major version, which meshkeeper does not plan; set spec.version to a %d.x release", target.Version, installed, from.major)
	case ahead < 0 || (ahead == 0 && releaseOlder(target.Version, installed)):
		// A downgrade: at most one minor back, as one canary rollout to the
		// older release (CheckDowngrade, the rule admission applies too).
		if err := CheckDowngrade(target.Version, installed); err != nil {
			return nil, fmt.Errorf("spec.version %w", err)
		}
		return []*bundle.Bundle{target}, nil
	case ahead == 0 && !target.CanUpgradeFrom(installed):
		return nil, fmt.Errorf("spec.version resolves to %s, older than installed %s: the planner only moves forward (bundles list the minors they upgrade from, never newer ones); set spec.version to %q to keep what runs",
			target.Version, installed, installed)
	}

	var path []*bundle.Bundle
	for m := from.minor + 1; m < to.minor; m++ {
		minor := fmt.Sprintf("%d.%d", from.major, m)
		b, err := cat.Resolve(minor)
		if err != nil {
			return nil, fmt.Errorf("no upgrade path from %s to %s: the catalog has no %s release and the mesh moves one minor at a time (known versions: %s); run a meshkeeper release whose catalog ships %s, or add a %s bundle under bundles/catalog/",
				installed, target.Version, minor, strings.Join(cat.Versions(), ", "), minor, minor)
		}
		path = append(path, b)
	}
	path = append(path, target)

	prev := installed
	for _, b := range path {
		if !b.CanUpgradeFrom(prev) {
			pm, _ := parseMinor(prev)
			return nil, fmt.Errorf("no upgrade path from %s to %s: bundle %s does not accept upgrades from %s (its upgradeFrom lists %s); set spec.version to a release reachable from %s, or add %q to upgradeFrom in bundles/catalog/%s.yaml once that upgrade is tested",
				installed, target.Version, b.Version, pm, quoteList(b.UpgradeFrom), pm, pm.String(), b.Version)
		}
		prev = b.Version
	}
	return path, nil
}

// CheckDowngrade is the one downgrade rule, applied by admission, the planner
// and so the controller: a spec.version (a release or a minor) at most one
// minor below installed is a canary rollout back to the older release; more
// than one minor back, or across a major version, is refused with the path to
// take. An empty installed version (nothing runs yet), a version that does not
// parse (validation reports it) and any upgrade pass.
func CheckDowngrade(version, installed string) error {
	want, err := parseMinor(version)
	have, errHave := parseMinor(installed)
	if installed == "" || err != nil || errHave != nil {
		return nil
	}
	back, sameMajor := minorsAhead(have, want)
	switch {
	case !sameMajor && want.major < have.major:
		return fmt.Errorf("%s is a downgrade from installed %s across a major version, which meshkeeper does not do: keep %s or roll forward",
			version, installed, have)
	case sameMajor && back > 1:
		var path []string
		for m := have.minor - 1; m > want.minor; m-- {
			path = append(path, fmt.Sprintf("%d.%d", have.major, m))
		}
		path = append(path, version)
		return fmt.Errorf("%s is %d minors below installed %s: a downgrade steps back one minor at a time, each a canary rollout; set spec.version to %s first, then %s",
			version, back, installed, path[0], strings.Join(path[1:], ", then "))
	}
	return nil
}

// releaseOlder says whether release a is older than release b (both
// MAJOR.MINOR.PATCH; false when either does not parse).
func releaseOlder(a, b string) bool {
	ma, mb := versionRE.FindStringSubmatch(a), versionRE.FindStringSubmatch(b)
	if ma == nil || mb == nil || ma[4] == "" || mb[4] == "" {
		return false
	}
	for _, i := range []int{1, 2, 4} { // major, minor, patch
		x, _ := strconv.Atoi(ma[i])
		y, _ := strconv.Atoi(mb[i])
		if x != y {
			return x < y
		}
	}
	return false
}

func quoteList(s []string) string {
	if len(s) == 0 {
		return "nothing"
	}
	q := make([]string, len(s))
	for i, v := range s {
		q[i] = strconv.Quote(v)
	}
	return strings.Join(q, ", ")
}
