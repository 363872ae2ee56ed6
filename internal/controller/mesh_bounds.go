package controller

import (
	"fmt"
	"strings"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// The CRD's MaxItems caps on status lists (api/v1alpha1, checked against the
// generated CRD in TestStatusCapsMatchTheCRD). A status over any of them is
// refused by the API server, and every status patch after it too: the lists
// are truncated to them, with a count of what was left out.
const (
	maxConflicts   = 64
	maxIgnored     = 64
	maxWaveMembers = 1024 // status.rollout.waveNamespaces and waveNodes
	maxCatalog     = 256  // status.catalog.bundles: the newest are kept
	// maxDryRunItems caps status.identity.dryRun.actions and .conflicts;
	// dryRunStatus (mesh_identity.go) keeps the first, and the counts of
	// the dry run say how many there are in all.
	maxDryRunItems = 64
	// maxHistory (mesh_status.go) caps status.history.
)

// capped is the first max items of list and how many it leaves out.
func capped(list []string, max int) ([]string, int32) {
	if len(list) <= max {
		return list, 0
	}
	return list[:max:max], int32(len(list) - max)
}

// setWaveNamespaces records the namespaces of the wave that moves, within
// the cap. The list is for display: what moves is computed from the waves,
// and a truncated wave is judged from them in full (reconcileRollout).
func setWaveNamespaces(ro *meshv1.RolloutStatus, wave []string) {
	ro.WaveNamespaces, ro.WaveNamespacesOmitted = capped(wave, maxWaveMembers)
}

// setWaveNodes records the nodes of the node wave that moves, within the
// cap; display only (what moves is computed from the node waves).
func setWaveNodes(ro *meshv1.RolloutStatus, wave []string) {
	ro.WaveNodes, ro.WaveNodesOmitted = capped(wave, maxWaveMembers)
}

// boundStatus truncates every capped status list to its cap, counting what
// it leaves out. It runs last before the status patch. A list already
// within its cap keeps its count (a wave recorded truncated stays so).
func boundStatus(st *meshv1.MeshStatus) {
	var n int32
	if st.Dataplane.Conflicts, n = capped(st.Dataplane.Conflicts, maxConflicts); n > 0 {
		st.Dataplane.ConflictsOmitted = n
	}
	if st.Ignored, n = capped(st.Ignored, maxIgnored); n > 0 {
		st.IgnoredOmitted = n
	}
	if over := len(st.History) - maxHistory; over > 0 {
		st.History = st.History[over:]
		st.HistoryOmitted += int32(over)
	}
	if w := st.Waypoints; w != nil {
		if w.Conflicts, n = capped(w.Conflicts, maxWaypointConflicts); n > 0 {
			w.ConflictsOmitted = n
		}
		if len(w.Items) > maxWaypointItems { // as many as spec.waypoints may hold
			w.Items = w.Items[:maxWaypointItems]
		}
	}
	if s := st.Security; s != nil { // mesh_mtls.go caps them when it lists
		if s.Conflicts, n = capped(s.Conflicts, maxMTLSConflicts); n > 0 {
			s.ConflictsOmitted = n
		}
		if s.OptOuts, n = capped(s.OptOuts, maxMTLSOptOuts); n > 0 {
			s.OptOutsOmitted = n
		}
	}
	if c := st.Catalog; c != nil {
		if over := len(c.Bundles) - maxCatalog; over > 0 {
			c.Bundles = c.Bundles[over:]
			c.BundlesOmitted = int32(over)
		}
	}
	if ro := st.Rollout; ro != nil {
		if len(ro.WaveNamespaces) > maxWaveMembers {
			setWaveNamespaces(ro, ro.WaveNamespaces)
		}
		if len(ro.WaveNodes) > maxWaveMembers {
			setWaveNodes(ro, ro.WaveNodes)
		}
	}
}

// nameList names at most a few of names, for messages and events (an
// event's note is at most 1 KiB, a condition's message 32 KiB):
// "a, b, c and 1097 more".
func nameList(names []string) string {
	return someOf(names, ", ")
}

// someOf joins at most ten of items with sep, then says how many more.
func someOf(items []string, sep string) string {
	const shown = 10
	if len(items) <= shown {
		return strings.Join(items, sep)
	}
	return fmt.Sprintf("%s and %d more", strings.Join(items[:shown], sep), len(items)-shown)
}
