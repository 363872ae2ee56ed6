package agent

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// podUIDPattern finds a pod UID in a cgroup path, in both kubelet layouts:
// cgroupfs ".../kubepods/burstable/pod1b4e.../<container>" and systemd
// ".../kubepods-burstable-pod1b4e_..._....slice/cri-containerd-<id>.scope".
var podUIDPattern = regexp.MustCompile(`pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})`)

// PodUIDFromCgroup returns the pod UID in the contents of a
// /proc/<pid>/cgroup file, or "" when the process belongs to no pod.
func PodUIDFromCgroup(content []byte) string {
	m := podUIDPattern.FindSubmatch(content)
	if m == nil {
		return ""
	}
	return strings.ReplaceAll(string(m[1]), "_", "-")
}

// procKey identifies one process instance: pids are reused, start times
// (in clock ticks since boot) tell the instances apart.
type procKey struct {
	pid   int
	start uint64
}

// procScanner maps pod UIDs to their processes by reading /proc. A quick
// scan reads the cgroup file of processes it has not seen before only; a
// full scan reads all of them again (catching pid reuse).
type procScanner struct {
	root  string
	known map[int]string // pid -> pod UID, "" for processes of no pod
}

func newProcScanner(root string) *procScanner {
	if root == "" {
		root = "/proc"
	}
	return &procScanner{root: root, known: map[int]string{}}
}

// scan returns the pids of every pod's processes.
func (s *procScanner) scan(full bool) (map[string][]int, error) {
	dir, err := os.Open(s.root)
	if err != nil {
		return nil, fmt.Errorf("scan %s: %w", s.root, err)
	}
	names, err := dir.Readdirnames(-1)
	dir.Close()
	if err != nil {
		return nil, fmt.Errorf("scan %s: %w", s.root, err)
	}
	if full {
		s.known = make(map[int]string, len(names))
	}
	alive := make(map[int]struct{}, len(names))
	pods := map[string][]int{}
	for _, name := range names {
		pid, err := strconv.Atoi(name)
		if err != nil {
			continue
		}
		alive[pid] = struct{}{}
		uid, ok := s.known[pid]
		if !ok {
			content, err := os.ReadFile(filepath.Join(s.root, name, "cgroup"))
			if err != nil {
				continue // exited meanwhile
			}
			uid = PodUIDFromCgroup(content)
			s.known[pid] = uid
		}
		if uid != "" {
			pods[uid] = append(pods[uid], pid)
		}
	}
	for pid := range s.known {
		if _, ok := alive[pid]; !ok {
			delete(s.known, pid)
		}
	}
	return pods, nil
}

// processStart reads a process's start time (field 22 of /proc/<pid>/stat).
func processStart(root string, pid int) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(root, strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	// The command (field 2) is in parentheses and may contain spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("malformed stat")
	}
	fields := strings.Fields(string(b[i+1:]))
	// fields[0] is field 3 (state); start time is field 22.
	if len(fields) < 20 {
		return 0, errors.New("malformed stat")
	}
	return strconv.ParseUint(fields[19], 10, 64)
}
