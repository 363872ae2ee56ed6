package controller

import (
	"testing"

	. "github.com/onsi/gomega"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// TestIdentityConditions: what identity does to Degraded and to whether the
// Mesh needs another reconcile by itself.
func TestIdentityConditions(t *testing.T) {
	cases := []struct {
		name    string
		obs     identityObservation
		reason  string
		settled bool
	}{
		{"registration runs", identityObservation{observed: true}, "", true},
		{"server down: Degraded, retried", identityObservation{unavailable: "the SPIRE server API does not answer"}, meshv1.ReasonIdentityUnavailable, false},
		{"dry run without conflicts: applied on the next reconcile", identityObservation{held: "publishing"}, meshv1.ReasonIdentityDryRun, false},
		{"dry run with conflicts: waits for an acknowledgement", identityObservation{held: "conflicts", heldForSpec: true}, meshv1.ReasonIdentityDryRun, true},
		{"refused entries: Degraded, not a hot loop", identityObservation{entryErrors: []string{"create x"}}, meshv1.ReasonEntryErrors, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			g := NewWithT(t)
			reason, _ := identityDegraded(&observation{identity: c.obs})
			g.Expect(reason).To(Equal(c.reason))
			g.Expect(c.obs.settled()).To(Equal(c.settled))
		})
	}
}

// TestNodeWaveWaitsForAttestedAgents: a node wave's nodes all need an
// attested SPIRE agent; without a server API (attested unknown) nothing waits.
func TestNodeWaveWaitsForAttestedAgents(t *testing.T) {
	g := NewWithT(t)
	g.Expect(identityObservation{}.unattested([]string{"a", "b"})).To(BeEmpty())
	o := identityObservation{attested: map[string]bool{"a": true}}
	g.Expect(o.unattested([]string{"a", "b", "c"})).To(Equal([]string{"b", "c"}))
	g.Expect(o.unattested([]string{"a"})).To(BeEmpty())
}
