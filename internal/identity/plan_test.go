package identity

import (
	"testing"
	"time"

	. "github.com/onsi/gomega"
)

func TestOwnerMarkIsProvable(t *testing.T) {
	g := NewWithT(t)
	owner := NewOwner("mesh-uid-1")
	d := Desired(owner, "example.org", time.Hour, []Workload{{"shop", "default"}})[1]
	g.Expect(owner.Owns(d)).To(BeTrue())
	g.Expect(d.ID).To(HavePrefix(IDPrefix))

	// The prefix alone is no proof: a foreign entry named like meshkeeper's
	// is still foreign, and so is a copy of the ID on another SPIFFE ID.
	fake := d
	fake.ID = IDPrefix + "0123456789abcdef0123456789abcdef"
	g.Expect(owner.Owns(fake)).To(BeFalse())
	moved := d
	moved.SPIFFEID = "spiffe://example.org/ns/shop/sa/admin"
	g.Expect(owner.Owns(moved)).To(BeFalse())
	// Another Mesh (another key) does not own it either.
	g.Expect(NewOwner("mesh-uid-2").Owns(d)).To(BeFalse())
}

func TestDesired(t *testing.T) {
	g := NewWithT(t)
	es := Desired(NewOwner("k"), "example.org", 12*time.Hour, []Workload{{"shop", "cart"}})
	g.Expect(es).To(HaveLen(2))
	alias, w := es[0], es[1]
	g.Expect(alias.SPIFFEID).To(Equal("spiffe://example.org/meshkeeper/cluster/meshkeeper"))
	g.Expect(alias.ParentID).To(Equal("spiffe://example.org/spire/server"))
	g.Expect(alias.Selectors).To(Equal([]string{"k8s_psat:cluster:meshkeeper"}))
	g.Expect(w.SPIFFEID).To(Equal("spiffe://example.org/ns/shop/sa/cart"))
	g.Expect(w.ParentID).To(Equal(alias.SPIFFEID))
	g.Expect(w.Selectors).To(Equal([]string{"k8s:ns:shop", "k8s:sa:cart"}))
	g.Expect(w.X509TTL).To(Equal(int32(12 * 3600)))
}

func TestDecide(t *testing.T) {
	owner := NewOwner("k")
	desired := Desired(owner, "example.org", time.Hour, []Workload{{"shop", "default"}, {"shop", "cart"}})
	alias, def, cart := desired[0], desired[1], desired[2]
	stale := Desired(owner, "example.org", time.Hour, []Workload{{"gone", "default"}})[1]
	oldTTL := cart
	oldTTL.X509TTL = 60
	joinToken := Entry{ID: "e1", SPIFFEID: "spiffe://example.org/node-a", ParentID: "spiffe://example.org/spire/server", Selectors: []string{"spiffe_id:spiffe://example.org/spire/agent/join_token/x"}}
	sameSel := Entry{ID: "e2", SPIFFEID: "spiffe://example.org/legacy/cart", ParentID: "spiffe://example.org/node-a", Selectors: []string{"k8s:ns:shop", "k8s:sa:cart"}}
	sameID := Entry{ID: "e3", SPIFFEID: "spiffe://example.org/ns/shop/sa/default", ParentID: "spiffe://example.org/node-a", Selectors: []string{"unix:uid:1000"}}
	wholeNS := Entry{ID: "e4", SPIFFEID: "spiffe://example.org/shop-all", ParentID: "spiffe://example.org/node-a", Selectors: []string{"k8s:ns:shop"}}
	lookalike := Entry{ID: IDPrefix + "ffffffffffffffffffffffffffffffff", SPIFFEID: "spiffe://example.org/ns/old/sa/x", ParentID: alias.SPIFFEID, Selectors: []string{"k8s:ns:old", "k8s:sa:x"}}

	cases := []struct {
		name      string
		observed  []Entry
		create    []string
		update    []string
		delete    []string
		unchanged int
		own       int
		foreign   int
		conflicts int
	}{
		{name: "empty server", create: []string{alias.SPIFFEID, def.SPIFFEID, cart.SPIFFEID}},
		{name: "all in place", observed: []Entry{alias, def, cart}, unchanged: 3, own: 3},
		{name: "ttl changed, one gone", observed: []Entry{alias, def, oldTTL, stale}, update: []string{cart.SPIFFEID}, delete: []string{stale.SPIFFEID}, unchanged: 2, own: 4},
		{name: "foreign entries are counted, never touched", observed: []Entry{joinToken, lookalike, alias, def, cart}, unchanged: 3, own: 3, foreign: 2},
		{name: "conflicts: same SPIFFE ID, same selectors, a whole namespace", observed: []Entry{joinToken, sameSel, sameID, wholeNS},
			create: []string{alias.SPIFFEID, def.SPIFFEID, cart.SPIFFEID}, foreign: 4, conflicts: 3},
		{name: "a foreign entry is not a conflict for an entry that already exists", observed: []Entry{alias, def, cart, sameSel}, unchanged: 3, own: 3, foreign: 1},
	}
	ids := func(es []Entry) []string {
		var out []string
		for _, e := range es {
			out = append(out, e.SPIFFEID)
		}
		return out
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			g := NewWithT(t)
			p := Decide(owner, desired, c.observed)
			g.Expect(ids(p.Create)).To(Equal(c.create))
			g.Expect(ids(p.Update)).To(Equal(c.update))
			g.Expect(ids(p.Delete)).To(Equal(c.delete))
			g.Expect(p.Unchanged).To(Equal(c.unchanged))
			g.Expect(p.Own).To(Equal(c.own))
			g.Expect(p.Foreign).To(Equal(c.foreign))
			g.Expect(p.Conflicts).To(HaveLen(c.conflicts))
			for _, d := range append(append([]Entry{}, p.Update...), p.Delete...) {
				g.Expect(owner.Owns(d)).To(BeTrue(), "only own entries are ever updated or deleted")
			}
		})
	}
}

func TestDigestNamesThePlan(t *testing.T) {
	g := NewWithT(t)
	owner := NewOwner("k")
	d1 := Desired(owner, "example.org", time.Hour, []Workload{{"shop", "default"}})
	d2 := Desired(owner, "example.org", time.Hour, []Workload{{"shop", "default"}, {"shop", "cart"}})
	p1, p1again, p2 := Decide(owner, d1, nil), Decide(owner, d1, nil), Decide(owner, d2, nil)
	g.Expect(p1.Digest()).To(Equal(p1again.Digest()))
	g.Expect(p1.Digest()).NotTo(Equal(p2.Digest()))
	g.Expect(p1.Digest()).To(MatchRegexp(`^[a-f0-9]{16}$`))
}

func TestGate(t *testing.T) {
	owner := NewOwner("k")
	desired := Desired(owner, "example.org", time.Hour, []Workload{{"shop", "cart"}})
	foreign := Entry{ID: "e1", SPIFFEID: "spiffe://example.org/node-a", ParentID: "spiffe://example.org/spire/server", Selectors: []string{"x:y"}}
	conflicting := Entry{ID: "e2", SPIFFEID: "spiffe://example.org/legacy", ParentID: "spiffe://example.org/node-a", Selectors: []string{"k8s:ns:shop", "k8s:sa:cart"}}
	clean := Decide(owner, desired, []Entry{foreign})
	conflicted := Decide(owner, desired, []Entry{foreign, conflicting})
	fresh := Decide(owner, desired, nil)

	cases := []struct {
		name  string
		gate  Gate
		plan  Plan
		apply bool
		state string
	}{
		{"a fresh server is registered at once", Gate{}, fresh, true, StateActive},
		{"a server with entries gets a dry run first", Gate{}, clean, false, StateDryRun},
		{"a published dry run without conflicts is applied", Gate{State: StateDryRun, Published: clean.Digest()}, clean, true, StateActive},
		{"a dry run that changed since it was published is published again", Gate{State: StateDryRun, Published: fresh.Digest()}, clean, false, StateDryRun},
		{"conflicts hold the dry run", Gate{State: StateDryRun, Published: conflicted.Digest()}, conflicted, false, StateDryRun},
		{"an acknowledgement of this dry run applies it", Gate{State: StateDryRun, Published: conflicted.Digest(), Acknowledged: conflicted.Digest()}, conflicted, true, StateActive},
		{"an acknowledgement of another dry run does not", Gate{State: StateDryRun, Acknowledged: clean.Digest()}, conflicted, false, StateDryRun},
		{"active stays active", Gate{State: StateActive}, conflicted, true, StateActive},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			g := NewWithT(t)
			d := c.gate.Decide(c.plan)
			g.Expect(d.Apply).To(Equal(c.apply))
			g.Expect(d.State).To(Equal(c.state))
			if !d.Apply {
				g.Expect(d.Why).To(ContainSubstring("status.identity.dryRun"))
			}
		})
	}
}
