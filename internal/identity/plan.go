package identity

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
)

// Plan is what reconciling the server's entries would do. It is computed by
// Decide and only ever touches entries the Owner proves are meshkeeper's.
type Plan struct {
	// Create are desired entries the server does not hold.
	Create []Entry
	// Update are meshkeeper's entries whose selectors or TTL differ from
	// what is desired (the desired form is given).
	Update []Entry
	// Delete are meshkeeper's entries nothing needs any more.
	Delete []Entry
	// Unchanged counts meshkeeper's entries that are already right.
	Unchanged int
	// Own and Foreign count the entries the server held.
	Own, Foreign int
	// Conflicts describe foreign entries that issue identities for the same
	// workloads as an entry meshkeeper would create. They are reported,
	// never touched.
	Conflicts []string
}

// Empty is true when the plan changes nothing.
func (p Plan) Empty() bool {
	return len(p.Create) == 0 && len(p.Update) == 0 && len(p.Delete) == 0
}

// Decide compares the desired entries with the server's and returns the
// plan. It is pure: the same inputs give the same plan, in a stable order.
func Decide(owner Owner, desired, observed []Entry) Plan {
	var p Plan
	own := make(map[string]Entry, len(observed))
	var foreign []Entry
	for _, e := range observed {
		if owner.Owns(e) {
			own[e.ID] = e
			p.Own++
			continue
		}
		foreign = append(foreign, e)
		p.Foreign++
	}
	wanted := make(map[string]bool, len(desired))
	for _, d := range desired {
		wanted[d.ID] = true
		switch cur, ok := own[d.ID]; {
		case !ok:
			p.Create = append(p.Create, d)
		case !d.sameSpec(cur):
			p.Update = append(p.Update, d)
		default:
			p.Unchanged++
		}
	}
	for _, e := range observed {
		if _, ok := own[e.ID]; ok && !wanted[e.ID] {
			p.Delete = append(p.Delete, e)
		}
	}
	slices.SortFunc(p.Delete, func(a, b Entry) int { return strings.Compare(a.SPIFFEID, b.SPIFFEID) })
	p.Conflicts = conflicts(p.Create, foreign)
	return p
}

// conflicts lists foreign entries that would also issue an identity to the
// workloads of an entry meshkeeper is about to create: the same SPIFFE ID,
// or selectors that are a subset of its k8s:ns/k8s:sa pair.
func conflicts(create, foreign []Entry) []string {
	if len(create) == 0 || len(foreign) == 0 {
		return nil
	}
	byID := make(map[string]bool, len(create))
	byPair := make(map[[2]string]string, len(create))
	byNS := map[string]string{}
	bySA := map[string]string{}
	for _, e := range create {
		byID[e.SPIFFEID] = true
		ns, sa, ok := workloadSelectors(e.Selectors)
		if !ok || ns == "" || sa == "" {
			continue
		}
		byPair[[2]string{ns, sa}] = e.SPIFFEID
		if _, seen := byNS[ns]; !seen {
			byNS[ns] = e.SPIFFEID
		}
		if _, seen := bySA[sa]; !seen {
			bySA[sa] = e.SPIFFEID
		}
	}
	var out []string
	for _, f := range foreign {
		if byID[f.SPIFFEID] {
			out = append(out, fmt.Sprintf("foreign entry %s issues %s too", f.ID, f.SPIFFEID))
			continue
		}
		ns, sa, ok := workloadSelectors(f.Selectors)
		if !ok {
			continue
		}
		var ours string
		switch {
		case ns != "" && sa != "":
			ours = byPair[[2]string{ns, sa}]
		case ns != "":
			ours = byNS[ns]
		case sa != "":
			ours = bySA[sa]
		}
		if ours != "" {
			out = append(out, fmt.Sprintf("foreign entry %s (%s, selectors %s) selects the workloads of %s",
				f.ID, f.SPIFFEID, strings.Join(f.Selectors, ","), ours))
		}
	}
	slices.Sort(out)
	return out
}

// workloadSelectors reads the k8s:ns and k8s:sa values of a selector set made
// only of those two; ok is false for any other set (or an empty one).
func workloadSelectors(sel []string) (ns, sa string, ok bool) {
	if len(sel) == 0 {
		return "", "", false
	}
	for _, s := range sel {
		switch {
		case strings.HasPrefix(s, selectorNamespace) && ns == "":
			ns = strings.TrimPrefix(s, selectorNamespace)
		case strings.HasPrefix(s, selectorServiceAccount) && sa == "":
			sa = strings.TrimPrefix(s, selectorServiceAccount)
		default:
			return "", "", false
		}
	}
	return ns, sa, true
}

// Actions lists the plan's actions as "create|update|delete <SPIFFE ID>",
// at most max of them (0: all).
func (p Plan) Actions(max int) []string {
	var out []string
	add := func(verb string, es []Entry) {
		for _, e := range es {
			if max > 0 && len(out) >= max {
				return
			}
			out = append(out, verb+" "+e.SPIFFEID)
		}
	}
	add("create", p.Create)
	add("update", p.Update)
	add("delete", p.Delete)
	return out
}

// Digest names the plan: two plans with the same actions, conflicts and
// counts of entries left alone have the same digest. An acknowledgement
// quotes it.
func (p Plan) Digest() string {
	h := sha256.New()
	fmt.Fprintf(h, "own %d foreign %d unchanged %d\n", p.Own, p.Foreign, p.Unchanged)
	for _, a := range p.Actions(0) {
		h.Write([]byte(a))
		h.Write([]byte{'\n'})
	}
	h.Write([]byte{0})
	for _, c := range p.Conflicts {
		h.Write([]byte(c))
		h.Write([]byte{'\n'})
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}
