package identity

import (
	"context"
	"fmt"
	"slices"

	"google.golang.org/grpc/codes"
)

// Outcome is what Apply did.
type Outcome struct {
	Created, Updated, Deleted int
	// Adopted counts creates answered ALREADY_EXISTS with an entry that is
	// meshkeeper's own (written by an earlier reconcile whose answer was lost).
	Adopted int
	// Errors are the entries the server refused, one line each.
	Errors []string
}

// maxErrors bounds the per-entry errors kept for status.
const maxErrors = 16

func (o *Outcome) fail(format string, args ...any) {
	if len(o.Errors) < maxErrors {
		o.Errors = append(o.Errors, fmt.Sprintf(format, args...))
	}
}

// Apply executes a plan: deletes first (only entries the Owner proves are
// meshkeeper's; Decide never puts another in a plan, and Apply checks again),
// then updates, then creates. Each entry's result of a batch call is handled
// on its own: a refused entry is reported and the others go on. The error is
// only for a call that failed as a whole (the server unreachable); what
// happened before it is in the Outcome.
func Apply(ctx context.Context, srv Server, owner Owner, p Plan) (Outcome, error) {
	var out Outcome
	if del := owned(owner, p.Delete); len(del) > 0 {
		ids := make([]string, len(del))
		for i, e := range del {
			ids[i] = e.ID
		}
		res, err := srv.DeleteEntries(ctx, ids)
		for i, r := range res {
			switch r.Code {
			case codes.OK, codes.NotFound: // gone either way
				out.Deleted++
			default:
				out.fail("delete %s (%s): %s: %s", del[i].SPIFFEID, ids[i], r.Code, r.Message)
			}
		}
		if err != nil {
			return out, err
		}
	}
	if len(p.Update) > 0 {
		upd := owned(owner, p.Update)
		res, err := srv.UpdateEntries(ctx, upd)
		for i, r := range res {
			if r.Code == codes.OK {
				out.Updated++
				continue
			}
			out.fail("update %s (%s): %s: %s", upd[i].SPIFFEID, upd[i].ID, r.Code, r.Message)
		}
		if err != nil {
			return out, err
		}
	}
	if len(p.Create) > 0 {
		res, err := srv.CreateEntries(ctx, p.Create)
		for i, r := range res {
			e := p.Create[i]
			switch {
			case r.Code == codes.OK:
				out.Created++
			case r.Code == codes.AlreadyExists && owner.Owns(r.Entry):
				out.Adopted++
			case r.Code == codes.AlreadyExists:
				// A similar entry (same SPIFFE ID, parent and selectors)
				// that is not meshkeeper's: left exactly as it is.
				out.fail("create %s: foreign entry %s already issues it with the same parent and selectors; it is not meshkeeper's, so meshkeeper neither adopts nor changes it", e.SPIFFEID, r.Entry.ID)
			default:
				out.fail("create %s: %s: %s", e.SPIFFEID, r.Code, r.Message)
			}
		}
		if err != nil {
			return out, err
		}
	}
	return out, nil
}

// owned keeps the entries the Owner proves are meshkeeper's.
func owned(owner Owner, es []Entry) []Entry {
	return slices.DeleteFunc(slices.Clone(es), func(e Entry) bool { return !owner.Owns(e) })
}

// Cleanup deletes every entry meshkeeper wrote and nothing else: what
// deleting the Mesh does. It returns how many it deleted and how many foreign
// entries it left.
func Cleanup(ctx context.Context, srv Server, owner Owner) (deleted, foreign int, err error) {
	entries, err := srv.ListEntries(ctx)
	if err != nil {
		return 0, 0, err
	}
	p := Decide(owner, nil, entries)
	out, err := Apply(ctx, srv, owner, p)
	if err != nil {
		return out.Deleted, p.Foreign, err
	}
	if len(out.Errors) > 0 {
		return out.Deleted, p.Foreign, fmt.Errorf("delete meshkeeper's SPIRE entries: %v", out.Errors)
	}
	return out.Deleted, p.Foreign, nil
}
