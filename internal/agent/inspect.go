package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// PinnedEnrolled reads the enrolled-namespaces map the agent pinned under
// pinPath, from outside the agent (tests, debugging on a node): netns cookie
// → entry. A missing pin is os.ErrNotExist.
func PinnedEnrolled(pinPath string) (map[uint64]NetnsEntry, error) {
	if pinPath == "" {
		pinPath = DefaultPinPath
	}
	path := filepath.Join(pinPath, mapPinnedName, "enrolled")
	m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("load pinned map %s: %w", path, err)
	}
	defer m.Close()
	out := map[uint64]NetnsEntry{}
	var k uint64
	var v NetnsEntry
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	return out, it.Err()
}

// Program names a BPF program the kernel runs.
type Program struct {
	ID   ebpf.ProgramID
	Name string
}

// LinkedPrograms lists the programs of the links the agent pinned under
// pinPath.
func LinkedPrograms(pinPath string) ([]Program, error) {
	if pinPath == "" {
		pinPath = DefaultPinPath
	}
	dir := filepath.Join(pinPath, linkPinnedName)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []Program
	for _, e := range entries {
		l, err := link.LoadPinnedLink(filepath.Join(dir, e.Name()), nil)
		if err != nil {
			return nil, fmt.Errorf("load pinned link %s: %w", e.Name(), err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			return nil, err
		}
		out = append(out, Program{ID: info.Program, Name: e.Name()})
	}
	return out, nil
}

// AttachedPrograms lists the programs attached to the cgroup at cgroupPath
// for any of the agent's attach types.
func AttachedPrograms(cgroupPath string) ([]Program, error) {
	f, err := os.Open(cgroupPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []Program
	var errs []error
	for _, a := range attachments {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: a.attach})
		if err != nil {
			errs = append(errs, fmt.Errorf("query %s programs of %s: %w", a.attach, cgroupPath, err))
			continue
		}
		for _, p := range res.Programs {
			prog, err := ebpf.NewProgramFromID(p.ID)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			info, err := prog.Info()
			prog.Close()
			if err != nil {
				errs = append(errs, err)
				continue
			}
			out = append(out, Program{ID: p.ID, Name: info.Name})
		}
	}
	return out, errors.Join(errs...)
}

// CgroupProgramNames are the programs the datapath attaches at the cgroup v2
// root, one pinned link each (links/<name>); the per-pod inbound links
// (links/mk_sk_lookup-<netns cookie>) come on top.
func CgroupProgramNames() []string {
	out := make([]string, 0, len(attachments))
	for _, a := range attachments {
		out = append(out, a.prog)
	}
	return out
}
