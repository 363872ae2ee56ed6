package agent

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"

	mkbpf "github.com/meshkeeper/meshkeeper/bpf"
)

// Connection results, in the order of pod_info.results in redirect.c.
var resultNames = [...]string{"ok", "refused", "reset", "timeout", "error"}

// NetnsEntry is one enrolled network namespace as the datapath sees it:
// the pod it belongs to and that namespace's L4 telemetry.
type NetnsEntry = mkbpf.RedirectPodInfo

// PodUIDOf returns the pod UID recorded in an entry.
func PodUIDOf(e *NetnsEntry) string {
	n := 0
	for n < len(e.PodUid) && e.PodUid[n] != 0 {
		n++
	}
	return string(e.PodUid[:n])
}

// NetnsMap is the enrolled-namespaces map: what the enroller needs from the
// datapath.
type NetnsMap interface {
	EnrollNetns(cookie uint64, podUID string) error
	UnenrollNetns(cookie uint64) (NetnsEntry, error)
	EnrolledNetns() (map[uint64]NetnsEntry, error)
}

// EnrollNetns adds a network namespace to the enrolled map. An entry that
// is there already for the same pod (an adopted one, after a restart) keeps
// its counters.
func (d *Datapath) EnrollNetns(cookie uint64, podUID string) error {
	var v NetnsEntry
	copy(v.PodUid[:len(v.PodUid)-1], podUID)
	err := d.objs.Enrolled.Update(cookie, &v, ebpf.UpdateNoExist)
	if errors.Is(err, ebpf.ErrKeyExist) {
		var cur NetnsEntry
		if err := d.objs.Enrolled.Lookup(cookie, &cur); err == nil && PodUIDOf(&cur) == podUID {
			return nil
		}
		err = d.objs.Enrolled.Update(cookie, &v, ebpf.UpdateAny)
	}
	if err != nil {
		return fmt.Errorf("enroll netns %d of pod %s: %w", cookie, podUID, err)
	}
	return nil
}

// UnenrollNetns removes a namespace and returns its last counters. Its
// inbound capture, if any, goes too.
func (d *Datapath) UnenrollNetns(cookie uint64) (NetnsEntry, error) {
	var v NetnsEntry
	if err := d.ReleaseInbound(cookie); err != nil {
		return v, fmt.Errorf("unenroll netns %d: %w", cookie, err)
	}
	if err := d.objs.Enrolled.Lookup(cookie, &v); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return v, fmt.Errorf("unenroll netns %d: %w", cookie, err)
	}
	if err := d.objs.Enrolled.Delete(cookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return v, fmt.Errorf("unenroll netns %d: %w", cookie, err)
	}
	return v, nil
}

// EnrolledNetns returns every enrolled namespace.
func (d *Datapath) EnrolledNetns() (map[uint64]NetnsEntry, error) {
	out := map[uint64]NetnsEntry{}
	var k uint64
	var v NetnsEntry
	it := d.objs.Enrolled.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read enrolled map: %w", err)
	}
	return out, nil
}

// MapUsage is a map's entry count and capacity.
type MapUsage struct {
	Entries, MaxEntries int
}

// MapUsage counts the entries of every datapath map (the config array
// counts as full).
func (d *Datapath) MapUsage() map[string]MapUsage {
	out := map[string]MapUsage{}
	for name, m := range d.Maps() {
		u := MapUsage{MaxEntries: int(m.MaxEntries())}
		if m.Type() == ebpf.Array {
			u.Entries = u.MaxEntries
		} else {
			u.Entries = countKeys(m)
		}
		out[name] = u
	}
	return out
}

// countKeys walks a hash map's keys (no values: cheap even for big maps).
func countKeys(m *ebpf.Map) int {
	key := make([]byte, m.KeySize())
	next := make([]byte, m.KeySize())
	n := 0
	var prev any // nil: start from the first key
	for n <= int(m.MaxEntries()) {
		if err := m.NextKey(prev, next); err != nil {
			break
		}
		n++
		copy(key, next)
		prev = key
	}
	return n
}
