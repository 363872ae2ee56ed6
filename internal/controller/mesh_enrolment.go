package controller

import (
	"fmt"
	"slices"
	"strings"
	"time"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// DefaultNotEnrolledGrace is how long a wanted pod may wait for its node
// agent to enrol it before the Mesh reports Degraded PodsNotEnrolled: a new
// pod is normally enrolled within a second of its sandbox starting, and
// image pulls happen after the sandbox exists.
const DefaultNotEnrolledGrace = 30 * time.Second

// maxPodsPerNode is how many pods the Degraded message names per node.
const maxPodsPerNode = 5

// nodeEnrolment is one eBPF node's enrolment report, from its MeshNode.
type nodeEnrolment struct {
	node   string
	report *meshv1.NodeEnrolment // nil: the agent has not reported enrolment yet
}

// podsNotEnrolled is the pure rule behind Degraded PodsNotEnrolled: it
// describes each node with wanted pods its agent has not enrolled for
// longer than grace, e.g. "node-c: 2 of 5 wanted pods not enrolled: shop/web-1
// (for 2m0s), shop/web-2 (for 45s)". recheck is when the next pod still
// within its grace period runs out of it (0 when none is waiting), so the
// condition is set on time without any MeshNode change.
func podsNotEnrolled(nodes []nodeEnrolment, now time.Time, grace time.Duration) (overdue []string, recheck time.Duration) {
	for _, n := range nodes {
		r := n.report
		if r == nil || r.Wanted == r.Enrolled && len(r.NotEnrolled) == 0 {
			continue
		}
		var names []string
		late := 0
		for _, p := range r.NotEnrolled {
			waited := now.Sub(p.Since.Time)
			if waited < grace {
				if left := grace - waited; recheck == 0 || left < recheck {
					recheck = left
				}
				continue
			}
			late++
			if len(names) < maxPodsPerNode {
				why := ""
				if p.Reason != "" {
					why = ": " + p.Reason
				}
				names = append(names, fmt.Sprintf("%s/%s (for %s%s)", p.Namespace, p.Name, waited.Round(time.Second), why))
			}
		}
		if late == 0 {
			continue
		}
		// The pods the agent left out of its list waited less than the
		// ones it listed: they count as late only when the last listed is.
		more := late - len(names)
		if last := r.NotEnrolled[len(r.NotEnrolled)-1]; now.Sub(last.Since.Time) >= grace {
			more += int(r.NotEnrolledOmitted)
		}
		msg := fmt.Sprintf("%s: %d of %d wanted pods not enrolled: %s", n.node, r.Wanted-r.Enrolled, r.Wanted, strings.Join(names, ", "))
		if more > 0 {
			msg += fmt.Sprintf(" and %d more", more)
		}
		overdue = append(overdue, msg)
	}
	slices.Sort(overdue)
	return overdue, recheck
}

// notEnrolledMessage is the Degraded message for overdue pods.
func notEnrolledMessage(overdue []string, grace time.Duration) string {
	return fmt.Sprintf("Pods meant to be redirected are not enrolled after %s, so their traffic bypasses the mesh: %s. "+
		"Check the node agent on those nodes (its log, and `kubectl get meshnode <node> -o yaml`)",
		grace, strings.Join(overdue, "; "))
}
