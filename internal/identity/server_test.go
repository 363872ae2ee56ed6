package identity_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	. "github.com/onsi/gomega"

	"github.com/meshkeeper/meshkeeper/internal/identity"
	"github.com/meshkeeper/meshkeeper/test/spire"
)

// foreignEntries writes, with the real spire-server CLI as an operator of the
// server would, the kinds of entries meshkeeper must never touch: a join
// token (which makes a join-token entry for its agent ID), a node entry
// selecting that agent, a static workload entry, and an entry with exactly
// the selectors meshkeeper's entry for shop/cart will have. It returns their
// SPIFFE IDs.
func foreignEntries(t *testing.T, s *spire.Server) []string {
	t.Helper()
	tok, err := s.JoinToken("spiffe://example.org/legacy/node-a")
	if err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"entry", "create", "-node", "-spiffeID", "spiffe://example.org/legacy/nodes", "-selector", "spiffe_id:spiffe://example.org/spire/agent/join_token/" + tok},
		{"entry", "create", "-parentID", "spiffe://example.org/legacy/nodes", "-spiffeID", "spiffe://example.org/static/db", "-selector", "unix:uid:999"},
		{"entry", "create", "-parentID", "spiffe://example.org/legacy/nodes", "-spiffeID", "spiffe://example.org/legacy/cart", "-selector", "k8s:ns:shop", "-selector", "k8s:sa:cart"},
	} {
		if _, err := s.CLI(args...); err != nil {
			t.Fatal(err)
		}
	}
	return []string{"spiffe://example.org/legacy/node-a", "spiffe://example.org/legacy/nodes", "spiffe://example.org/static/db", "spiffe://example.org/legacy/cart"}
}

func dial(t *testing.T, s *spire.Server) identity.Server {
	t.Helper()
	srv, err := identity.Dial("unix://"+s.Socket, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	return srv
}

func spiffeIDs(es []identity.Entry) []string {
	out := make([]string, 0, len(es))
	for _, e := range es {
		out = append(out, e.SPIFFEID)
	}
	return out
}

// TestRegistrationAgainstARealServer: a dry run on a server that already
// holds entries, then install, churn and cleanup; the foreign entries survive
// every step unchanged.
func TestRegistrationAgainstARealServer(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	s := spire.StartServer(t, spire.ServerOptions{})
	foreign := foreignEntries(t, s)
	srv := dial(t, s)
	owner := identity.NewOwner("mesh-uid")

	before, err := srv.ListEntries(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(spiffeIDs(before)).To(ConsistOf(foreign))

	workloads := []identity.Workload{{"shop", "default"}, {"shop", "cart"}, {"pay", "default"}}
	desired := identity.Desired(owner, "example.org", 2*time.Hour, workloads)

	// The dry run lists what would be created and the conflict, and counts
	// the foreign entries it leaves alone.
	p := identity.Decide(owner, desired, before)
	g.Expect(p.Actions(0)).To(Equal([]string{
		"create spiffe://example.org/meshkeeper/cluster/meshkeeper",
		"create spiffe://example.org/ns/shop/sa/default",
		"create spiffe://example.org/ns/shop/sa/cart",
		"create spiffe://example.org/ns/pay/sa/default",
	}))
	g.Expect(p.Foreign).To(Equal(4))
	g.Expect(p.Own).To(Equal(0))
	g.Expect(p.Conflicts).To(HaveLen(1))
	g.Expect(p.Conflicts[0]).To(ContainSubstring("spiffe://example.org/legacy/cart"))
	g.Expect(p.Conflicts[0]).To(ContainSubstring("spiffe://example.org/ns/shop/sa/cart"))
	d := identity.Gate{}.Decide(p)
	g.Expect(d.Apply).To(BeFalse(), "the first reconcile against a server with entries is a dry run")

	out, err := identity.Apply(ctx, srv, owner, p)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(out.Created).To(Equal(4))
	g.Expect(out.Errors).To(BeEmpty())

	after, err := srv.ListEntries(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(spiffeIDs(after)).To(ConsistOf(append([]string{
		"spiffe://example.org/meshkeeper/cluster/meshkeeper",
		"spiffe://example.org/ns/shop/sa/default",
		"spiffe://example.org/ns/shop/sa/cart",
		"spiffe://example.org/ns/pay/sa/default",
	}, foreign...)))
	for _, e := range after {
		if strings.Contains(e.SPIFFEID, "/ns/") {
			g.Expect(e.X509TTL).To(Equal(int32(7200)))
			g.Expect(e.ParentID).To(Equal("spiffe://example.org/meshkeeper/cluster/meshkeeper"))
		}
	}
	// Reading back what it wrote, meshkeeper finds nothing to do.
	again := identity.Decide(owner, desired, after)
	g.Expect(again.Empty()).To(BeTrue(), "%v", again.Actions(0))
	g.Expect(again.Own).To(Equal(4))
	g.Expect(again.Foreign).To(Equal(4))

	// Churn: pay leaves the mesh, the TTL changes.
	desired = identity.Desired(owner, "example.org", time.Hour, workloads[:2])
	p = identity.Decide(owner, desired, after)
	g.Expect(spiffeIDs(p.Delete)).To(Equal([]string{"spiffe://example.org/ns/pay/sa/default"}))
	g.Expect(p.Update).To(HaveLen(2))
	out, err = identity.Apply(ctx, srv, owner, p)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(out.Errors).To(BeEmpty())
	g.Expect([]int{out.Deleted, out.Updated}).To(Equal([]int{1, 2}))

	// Cleanup (deleting the Mesh) removes exactly meshkeeper's entries.
	deleted, left, err := identity.Cleanup(ctx, srv, owner)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(deleted).To(Equal(3))
	g.Expect(left).To(Equal(4))
	final, err := srv.ListEntries(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(final).To(ConsistOf(before), "the foreign entries are exactly as they were")
}

// TestAlreadyExists: a create answered ALREADY_EXISTS is adopted only when
// the existing entry is meshkeeper's own.
func TestAlreadyExists(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	s := spire.StartServer(t, spire.ServerOptions{})
	srv := dial(t, s)
	owner := identity.NewOwner("mesh-uid")
	desired := identity.Desired(owner, "example.org", time.Hour, []identity.Workload{{"shop", "default"}, {"shop", "cart"}})
	// A foreign entry with the very SPIFFE ID, parent and selectors of
	// meshkeeper's shop/cart entry, but another ID.
	_, err := s.CLI("entry", "create", "-entryID", "someone-else", "-parentID", desired[2].ParentID, "-spiffeID", desired[2].SPIFFEID,
		"-selector", "k8s:ns:shop", "-selector", "k8s:sa:cart", "-x509SVIDTTL", "3600")
	g.Expect(err).NotTo(HaveOccurred())

	out, err := identity.Apply(ctx, srv, owner, identity.Decide(owner, desired, nil))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(out.Created).To(Equal(2))
	g.Expect(out.Errors).To(HaveLen(1))
	g.Expect(out.Errors[0]).To(ContainSubstring("foreign entry someone-else"))

	// The same plan again (as when a reconcile's answer was lost): meshkeeper's
	// own entries come back ALREADY_EXISTS and are adopted.
	out, err = identity.Apply(ctx, srv, owner, identity.Decide(owner, desired[:2], nil))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(out.Adopted).To(Equal(2))
	g.Expect(out.Created).To(Equal(0))
	g.Expect(out.Errors).To(BeEmpty())

	entries, err := srv.ListEntries(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	p := identity.Decide(owner, desired[:2], entries)
	g.Expect(p.Own).To(Equal(2))
	g.Expect(p.Foreign).To(Equal(1))
}

// TestServerDownMidReconcile: with the server gone after the plan was made,
// Apply fails as a whole and deletes nothing; the entries are all there when
// the server is back, and the next reconcile finishes the job.
func TestServerDownMidReconcile(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	s := spire.StartServer(t, spire.ServerOptions{})
	foreign := foreignEntries(t, s)
	srv := dial(t, s)
	owner := identity.NewOwner("mesh-uid")
	workloads := []identity.Workload{{"shop", "default"}, {"pay", "default"}}
	_, err := identity.Apply(ctx, srv, owner, identity.Decide(owner, identity.Desired(owner, "example.org", time.Hour, workloads), nil))
	g.Expect(err).NotTo(HaveOccurred())
	entries, err := srv.ListEntries(ctx)
	g.Expect(err).NotTo(HaveOccurred())

	p := identity.Decide(owner, identity.Desired(owner, "example.org", time.Hour, workloads[:1]), entries)
	g.Expect(p.Delete).To(HaveLen(1))
	s.Stop()
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	_, err = identity.Apply(cctx, srv, owner, p)
	g.Expect(err).To(HaveOccurred())
	_, err = srv.ListEntries(cctx)
	g.Expect(err).To(HaveOccurred())

	g.Expect(s.Start()).To(Succeed())
	g.Eventually(func() ([]string, error) {
		es, err := srv.ListEntries(ctx)
		return spiffeIDs(es), err
	}).WithTimeout(20 * time.Second).Should(ConsistOf(append([]string{
		"spiffe://example.org/meshkeeper/cluster/meshkeeper",
		"spiffe://example.org/ns/shop/sa/default",
		"spiffe://example.org/ns/pay/sa/default",
	}, foreign...)))
	out, err := identity.Apply(ctx, srv, owner, p)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(out.Deleted).To(Equal(1))
}

// TestMeasureEntriesPerSecond prints how fast 5,000 service accounts are
// registered from scratch, and how fast a reconcile that finds them all in
// place runs (the README's identity table).
func TestMeasureEntriesPerSecond(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: measurement (-short)")
	}
	g := NewWithT(t)
	ctx := context.Background()
	s := spire.StartServer(t, spire.ServerOptions{})
	srv := dial(t, s)
	owner := identity.NewOwner("mesh-uid")
	var workloads []identity.Workload
	for ns := range 50 {
		for sa := range 100 {
			workloads = append(workloads, identity.Workload{Namespace: fmt.Sprintf("ns-%02d", ns), ServiceAccount: fmt.Sprintf("sa-%03d", sa)})
		}
	}
	desired := identity.Desired(owner, "example.org", time.Hour, workloads)

	start := time.Now()
	observed, err := srv.ListEntries(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	out, err := identity.Apply(ctx, srv, owner, identity.Decide(owner, desired, observed))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(out.Errors).To(BeEmpty())
	g.Expect(out.Created).To(Equal(len(desired)))
	create := time.Since(start)

	start = time.Now()
	observed, err = srv.ListEntries(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	p := identity.Decide(owner, desired, observed)
	steady := time.Since(start)
	g.Expect(p.Empty()).To(BeTrue())
	g.Expect(p.Own).To(Equal(len(desired)))

	// One namespace of 100 service accounts leaves, another joins.
	churned := append(append([]identity.Workload{}, workloads[100:]...), func() []identity.Workload {
		var w []identity.Workload
		for sa := range 100 {
			w = append(w, identity.Workload{Namespace: "ns-new", ServiceAccount: fmt.Sprintf("sa-%03d", sa)})
		}
		return w
	}()...)
	start = time.Now()
	observed, err = srv.ListEntries(ctx)
	g.Expect(err).NotTo(HaveOccurred())
	out, err = identity.Apply(ctx, srv, owner, identity.Decide(owner, identity.Desired(owner, "example.org", time.Hour, churned), observed))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect([]int{out.Created, out.Deleted}).To(Equal([]int{100, 100}))
	churn := time.Since(start)

	n := float64(len(desired))
	t.Logf("MEASURE 5,000 service accounts (+1 node alias) against spire-server v1.13.3 (sqlite):")
	t.Logf("MEASURE   register from scratch: %v, %.0f entries/s", create.Round(time.Millisecond), n/create.Seconds())
	t.Logf("MEASURE   reconcile with all in place (list + decide): %v, %.0f entries/s", steady.Round(time.Millisecond), n/steady.Seconds())
	t.Logf("MEASURE   one namespace of 100 leaves, another of 100 joins: %v", churn.Round(time.Millisecond))
}
