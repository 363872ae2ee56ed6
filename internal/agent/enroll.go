package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/go-logr/logr"

	"github.com/meshkeeper/meshkeeper/internal/agent/zds"
)

// PodRef names a pod.
type PodRef struct {
	Namespace, Name, UID string
	// Revision is the control-plane revision the pod runs (its namespace's
	// istio.io/rev), for the workload_revision label; it may change while
	// the pod lives, when its namespace moves.
	Revision string
	// ServiceAccount is the pod's service account, which ztunnel is told
	// with the pod's netns (its identity).
	ServiceAccount string
}

func (p PodRef) String() string { return p.Namespace + "/" + p.Name }

// Intervals of the enroller's /proc scans.
const (
	// PendingScanInterval is how often /proc is scanned for new processes
	// while a pod waits for its network namespace to appear.
	PendingScanInterval = 20 * time.Millisecond
	// PendingFastFor is how long a pod is looked for at PendingScanInterval;
	// after that it is looked for at every full scan only.
	PendingFastFor = 2 * time.Minute
	// FullScanInterval is how often every pod's namespaces are checked again
	// (replaced sandboxes, reused pids).
	FullScanInterval = 15 * time.Second
)

type podState struct {
	ref      PodRef
	cookies  map[uint64]struct{}
	explicit bool      // enrolled through an explicit netns path, not found by scanning
	since    time.Time // when it was wanted
	retired  NetnsEntry
	// handedOff is the netns cookie last handed to ztunnel (0: none yet).
	handedOff uint64
	// inboundWait is an adopted netns whose inbound is not captured yet:
	// ztunnel's listener there predates the datapath's listen hook, so it
	// is captured once ztunnel listens again (0: none).
	inboundWait uint64
	// gone: the pod was deleted from the API server while a namespace of
	// it was enrolled. It stays enrolled (and with ztunnel) until its
	// sandbox is gone; see Gone.
	gone bool
}

// Handoff is where enrolled pods' network namespaces go besides the
// datapath: ztunnel, through the agent's ZDS server (*zds.Server).
type Handoff interface {
	AddWorkload(ctx context.Context, uid string, netns *os.File, info zds.WorkloadInfo) error
	KeepWorkload(uid string, info zds.WorkloadInfo)
	DelWorkload(ctx context.Context, uid string) error
}

// HandoffTimeout bounds one hand-off to ztunnel (its ack included).
const HandoffTimeout = 5 * time.Second

// Enroller keeps the datapath's enrolled map equal to the network
// namespaces of the pods it is told to want. Pods are found by scanning
// the host's procfs (procRoot) for processes whose cgroup names the pod UID.
type Enroller struct {
	maps       NetnsMap
	procRoot   string
	hostCookie uint64
	log        logr.Logger

	mu      sync.Mutex
	pods    map[string]*podState // by UID
	orphans map[uint64]string    // enrolled cookies no wanted pod claims yet -> pod UID
	scanner *procScanner
	cookies map[procKey]uint64 // process instance -> its netns cookie
	wake    chan struct{}
	now     func() time.Time
	handoff Handoff // nil: the datapath only
}

// SetHandoff makes the enroller hand each pod's netns to ztunnel before it
// redirects the pod's traffic, and tell ztunnel when the pod is gone. Call
// it before Run.
func (e *Enroller) SetHandoff(h Handoff) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.handoff = h
}

// NewEnroller adopts what the map holds already (after an agent restart
// nothing is removed until Reconcile).
func NewEnroller(maps NetnsMap, procRoot string, log logr.Logger) (*Enroller, error) {
	if procRoot == "" {
		procRoot = "/proc"
	}
	host, fallback, err := hostNetnsCookie(procRoot)
	if err != nil {
		return nil, err
	}
	if fallback != nil {
		log.Info("Cannot open PID 1's network namespace; refusing the agent's own instead", "procRoot", procRoot, "error", fallback.Error())
	}
	e := &Enroller{
		maps: maps, procRoot: procRoot, hostCookie: host, log: log,
		pods: map[string]*podState{}, orphans: map[uint64]string{},
		scanner: newProcScanner(procRoot), cookies: map[procKey]uint64{},
		wake: make(chan struct{}, 1), now: time.Now,
	}
	existing, err := maps.EnrolledNetns()
	if err != nil {
		return nil, err
	}
	for cookie, entry := range existing {
		e.orphans[cookie] = PodUIDOf(&entry)
	}
	return e, nil
}

// Want asks for a pod to be enrolled. Its namespace is found by scanning
// /proc, quickly while it is new.
func (e *Enroller) Want(ref PodRef) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.pods[ref.UID]; ok {
		e.podLocked(ref)
		return
	}
	if p := e.podLocked(ref); len(p.cookies) == 0 {
		e.poke()
	}
}

// podLocked returns the pod's state with ref as its latest description,
// made on first sight with the namespaces a previous agent enrolled for
// it (adopted from the pinned map). e.mu is held.
func (e *Enroller) podLocked(ref PodRef) *podState {
	if p, ok := e.pods[ref.UID]; ok {
		p.ref = ref
		return p
	}
	p := &podState{ref: ref, cookies: map[uint64]struct{}{}, since: e.now()}
	for cookie, uid := range e.orphans {
		if uid == ref.UID {
			p.cookies[cookie] = struct{}{}
			delete(e.orphans, cookie)
		}
	}
	e.pods[ref.UID] = p
	return p
}

// EnrollPath enrolls a pod's network namespace given by path right away
// (for a CNI plugin, tests, or a pod the agent was told about directly).
func (e *Enroller) EnrollPath(ref PodRef, netnsPath string) error {
	cookie, err := NetnsCookie(netnsPath)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	p := e.podLocked(ref)
	p.explicit = true
	return e.enroll(p, cookie, netnsPath)
}

// Enroll enrolls the network namespace of process pid for a pod.
func (e *Enroller) Enroll(ref PodRef, pid int) error {
	return e.EnrollPath(ref, filepath.Join(e.procRoot, strconv.Itoa(pid), "ns", "net"))
}

// Forget unenrolls a pod at once (finished, opted out, or its namespace
// left the mesh). A pod deleted from the API server is Gone instead.
func (e *Enroller) Forget(uid string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if p, ok := e.pods[uid]; ok {
		e.forgetLocked(uid, p)
	}
}

// Gone is told that a pod was deleted from the API server. That is not
// when its containers stop: a pod deleted with a zero grace period
// (terminationGracePeriodSeconds: 0, or kubectl delete --force) leaves the
// API server at once, and the kubelet kills its containers afterwards,
// giving each at least 2 s to stop, so the pod can still connect for a
// while. Unenrolling it now would let those connections go out around
// ztunnel. So a pod with an enrolled namespace stays enrolled, and with
// ztunnel, until its sandbox is gone: the CNI DEL of its sandbox
// (ReleaseNetns), which the runtime sends only after every container
// stopped, or a full scan that finds no process left in its namespace.
// A pod with nothing enrolled is forgotten at once.
func (e *Enroller) Gone(uid string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	p, ok := e.pods[uid]
	if !ok {
		return
	}
	if len(p.cookies) == 0 {
		e.forgetLocked(uid, p)
		return
	}
	p.gone = true
	e.log.V(1).Info("Pod deleted; it stays enrolled until its sandbox is gone", "pod", p.ref.String())
}

// forgetLocked unenrolls a pod and tells ztunnel. e.mu is held.
func (e *Enroller) forgetLocked(uid string, p *podState) {
	for cookie := range p.cookies {
		if _, err := e.maps.UnenrollNetns(cookie); err != nil {
			e.log.Error(err, "Unenrolling pod failed", "pod", p.ref.String())
		}
	}
	delete(e.pods, uid)
	e.handoffDelete(uid, p.ref.String())
	e.log.V(1).Info("Pod unenrolled", "pod", p.ref.String())
}

// Unenroll is Forget by pod UID, for symmetry with Enroll.
func (e *Enroller) Unenroll(uid string) { e.Forget(uid) }

// Reconcile removes every enrolled namespace that no wanted pod claims. Call
// it once the list of wanted pods is complete (informers synced).
func (e *Enroller) Reconcile() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for cookie, uid := range e.orphans {
		if _, err := e.maps.UnenrollNetns(cookie); err != nil {
			e.log.Error(err, "Removing stale enrolment failed", "podUID", uid)
			continue
		}
		delete(e.orphans, cookie)
		e.log.Info("Removed stale enrolment", "podUID", uid, "netnsCookie", cookie)
		// ztunnel may still proxy it from before the agent restarted.
		e.handoffDelete(uid, uid)
	}
}

// KeepUnfound tells the hand-off to keep (not drop) every wanted pod that
// is enrolled in the datapath but whose netns the agent has not opened
// yet, such as a pod adopted from the pinned map after an agent restart
// whose processes the scan has not found. Call it before the first
// snapshot is served.
func (e *Enroller) KeepUnfound() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.handoff == nil {
		return
	}
	for uid, p := range e.pods {
		if len(p.cookies) > 0 && p.handedOff == 0 {
			e.handoff.KeepWorkload(uid, workloadInfo(p.ref))
		}
	}
}

func (e *Enroller) poke() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// Run scans /proc until ctx ends: every PendingScanInterval while a new pod
// waits for its namespace, every FullScanInterval otherwise.
func (e *Enroller) Run(ctx context.Context) {
	full := time.NewTicker(FullScanInterval)
	defer full.Stop()
	fast := time.NewTicker(PendingScanInterval)
	defer fast.Stop()
	e.Sync(true)
	for {
		select {
		case <-ctx.Done():
			return
		case <-full.C:
			e.Sync(true)
		case <-e.wake:
			e.Sync(false)
		case <-fast.C:
			if e.hasFreshPending() {
				e.Sync(false)
			}
		}
	}
}

func (e *Enroller) hasFreshPending() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	now := e.now()
	for _, p := range e.pods {
		if len(p.cookies) == 0 && now.Sub(p.since) < PendingFastFor {
			return true
		}
	}
	return false
}

// Sync scans /proc once. A quick scan looks for pods without a namespace
// yet; a full scan checks every pod (a replaced sandbox has a new one).
func (e *Enroller) Sync(full bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	need := false
	for _, p := range e.pods {
		if full || len(p.cookies) == 0 {
			need = true
			break
		}
	}
	if !need {
		return
	}
	pids, err := e.scanner.scan(full)
	if err != nil {
		e.log.Error(err, "Scanning processes failed")
		return
	}
	if full {
		e.cookies = map[procKey]uint64{}
	}
	for uid, p := range e.pods {
		if p.gone {
			e.sweepGone(uid, p, pids[uid])
			continue
		}
		if p.explicit || (!full && len(p.cookies) > 0) {
			continue
		}
		found := map[uint64]int{} // netns cookie -> a pid in it
		for _, pid := range pids[uid] {
			if c, ok := e.cookieOf(pid); ok {
				found[c] = pid
			}
		}
		if len(found) == 0 {
			continue // not started yet, or only host-network processes
		}
		for c, pid := range found {
			path := filepath.Join(e.procRoot, strconv.Itoa(pid), "ns", "net")
			if _, ok := p.cookies[c]; !ok {
				if err := e.enroll(p, c, path); err != nil {
					e.log.Error(err, "Enrolling pod failed", "pod", p.ref.String())
				}
			} else if e.handoff != nil && p.handedOff != c {
				// Enrolled before this agent started (adopted from the
				// pinned map): ztunnel gets it now, and its inbound is
				// captured (the pinned link, if any, is adopted).
				_ = e.handOff(p, c, path)
				e.captureAdopted(p, c, path)
			}
		}
		if full {
			for c := range p.cookies {
				if _, ok := found[c]; !ok {
					e.retire(p, c)
				}
			}
		}
	}
	if full {
		for _, p := range e.pods {
			if p.inboundWait != 0 {
				e.captureWaiting(p)
			}
		}
	}
}

// sweepGone releases the namespaces of a deleted pod in which none of its
// processes is left (its sandbox is gone), and forgets the pod once none
// is left. pids are the pod's processes of this scan. e.mu is held.
func (e *Enroller) sweepGone(uid string, p *podState, pids []int) {
	alive := map[uint64]bool{}
	for _, pid := range pids {
		if c, ok := e.cookieOf(pid); ok {
			alive[c] = true
		}
	}
	for c := range p.cookies {
		if !alive[c] {
			e.retire(p, c)
		}
	}
	if len(p.cookies) == 0 {
		e.forgetLocked(uid, p)
	}
}

// cookieOf returns the netns cookie of a process, cached per process
// instance; false for host-network processes and ones that exited.
func (e *Enroller) cookieOf(pid int) (uint64, bool) {
	start, err := processStart(e.procRoot, pid)
	if err != nil {
		return 0, false
	}
	key := procKey{pid, start}
	c, ok := e.cookies[key]
	if !ok {
		c, err = NetnsCookie(filepath.Join(e.procRoot, strconv.Itoa(pid), "ns", "net"))
		if err != nil {
			return 0, false
		}
		e.cookies[key] = c
	}
	return c, c != e.hostCookie
}

// enroll hands a pod's netns to ztunnel (when there is a hand-off), then
// redirects it: ztunnel listens in the netns before the first connection
// is sent there. A failed hand-off still redirects (fail closed, as
// istio-cni does): the pod's traffic never leaves the mesh unseen, and the
// next ztunnel's snapshot carries the pod.
func (e *Enroller) enroll(p *podState, cookie uint64, netnsPath string) error {
	if cookie == e.hostCookie {
		return fmt.Errorf("pod %s: refusing to enroll the host network namespace", p.ref)
	}
	_ = e.handOff(p, cookie, netnsPath)
	if err := e.redirect(p, cookie); err != nil {
		return err
	}
	if err := e.captureInboundPath(p, cookie, netnsPath); err != nil {
		e.log.Error(err, "Capturing the pod's inbound traffic failed; its inbound connections reach the application without ztunnel", "pod", p.ref.String())
	}
	return nil
}

// redirect puts the netns in the redirect map.
func (e *Enroller) redirect(p *podState, cookie uint64) error {
	if err := e.maps.EnrollNetns(cookie, p.ref.UID); err != nil {
		return err
	}
	p.cookies[cookie] = struct{}{}
	delete(e.orphans, cookie)
	e.log.Info("Pod enrolled", "pod", p.ref.String(), "netnsCookie", cookie, "after", e.now().Sub(p.since).Round(time.Millisecond).String())
	return nil
}

// InboundCapturer is the inbound side of the datapath (*Datapath): it
// captures a namespace's inbound TCP to ztunnel's in-pod listener, which the
// kernel finds by itself (CaptureInboundNetns). UnenrollNetns releases it.
type InboundCapturer interface {
	CaptureInboundNetns(cookie uint64, netns *os.File) error
	// InboundListener tells whether ztunnel's listener of the netns is in
	// the capture map, InboundLinked whether the netns is captured.
	InboundListener(cookie uint64) (bool, error)
	InboundLinked(cookie uint64) bool
}

// captureAdopted captures the inbound of a pod enrolled before this agent
// started, unless that would refuse its inbound connections: when the netns
// is not captured yet and ztunnel's listener there is not in the capture
// map (it listened before this datapath had its listen hook: an agent
// upgraded from one without inbound capture, or reinstalled under a
// running ztunnel), its inbound stays as it is, reaching the application,
// and is captured at the first full scan after ztunnel listens again.
func (e *Enroller) captureAdopted(p *podState, cookie uint64, path string) {
	c, ok := e.maps.(InboundCapturer)
	if !ok || e.handoff == nil {
		return
	}
	if !c.InboundLinked(cookie) {
		if has, err := c.InboundListener(cookie); err != nil || !has {
			if p.inboundWait != cookie {
				e.log.Info("ztunnel's inbound listener of this pod predates the datapath's listen hook; its inbound reaches the application without ztunnel until ztunnel listens again (restart ztunnel to capture it now)", "pod", p.ref.String(), "netnsCookie", cookie)
			}
			p.inboundWait = cookie
			return
		}
	}
	p.inboundWait = 0
	if err := e.captureInboundPath(p, cookie, path); err != nil {
		e.log.Error(err, "Capturing the pod's inbound traffic failed; its inbound connections reach the application without ztunnel", "pod", p.ref.String())
	}
}

// captureWaiting captures an adopted pod's inbound once ztunnel's listener
// is in the capture map.
func (e *Enroller) captureWaiting(p *podState) {
	cookie := p.inboundWait
	c, ok := e.maps.(InboundCapturer)
	if _, enrolled := p.cookies[cookie]; !ok || !enrolled {
		p.inboundWait = 0
		return
	}
	if has, err := c.InboundListener(cookie); err != nil || !has {
		return
	}
	f, err := e.openNetns(cookie)
	if err != nil {
		return // found again by the scan, with its path
	}
	defer f.Close()
	p.inboundWait = 0
	if err := e.captureInbound(p, cookie, f); err != nil {
		e.log.Error(err, "Capturing the pod's inbound traffic failed; its inbound connections reach the application without ztunnel", "pod", p.ref.String())
		return
	}
	e.log.Info("ztunnel listens in the pod again: its inbound is captured", "pod", p.ref.String(), "netnsCookie", cookie)
}

// openNetns opens the network namespace of a netns cookie through a process
// of the last scan that lives in it.
func (e *Enroller) openNetns(cookie uint64) (*os.File, error) {
	for k, c := range e.cookies {
		if c != cookie {
			continue
		}
		f, err := os.Open(filepath.Join(e.procRoot, strconv.Itoa(k.pid), "ns", "net"))
		if err != nil {
			continue
		}
		if got, err := fileNetnsCookie(f); err == nil && got == cookie {
			return f, nil
		}
		f.Close()
	}
	return nil, fmt.Errorf("no process in netns %d", cookie)
}

// captureInbound sends the pod's inbound TCP to ztunnel's inbound listener
// in its netns. Only for pods handed to ztunnel: without a hand-off (the
// datapath alone) nobody listens there. A pod whose hand-off failed is
// captured all the same (fail closed): its inbound connections are refused
// until ztunnel, taking it from its next snapshot, listens.
func (e *Enroller) captureInbound(p *podState, cookie uint64, netns *os.File) error {
	c, ok := e.maps.(InboundCapturer)
	if !ok || e.handoff == nil {
		return nil
	}
	if err := c.CaptureInboundNetns(cookie, netns); errors.Is(err, ErrNoInboundAddr) {
		// Nothing can reach it from outside (yet): nothing to capture.
		e.log.Info("The pod's network namespace has no address; its inbound is not captured", "pod", p.ref.String(), "netnsCookie", cookie)
		return nil
	} else if err != nil {
		return err
	}
	e.log.V(1).Info("Pod's inbound captured", "pod", p.ref.String(), "netnsCookie", cookie)
	return nil
}

func (e *Enroller) captureInboundPath(p *podState, cookie uint64, netnsPath string) error {
	if _, ok := e.maps.(InboundCapturer); !ok || e.handoff == nil {
		return nil
	}
	f, err := os.Open(netnsPath)
	if err != nil {
		return fmt.Errorf("open the pod's network namespace: %w", err)
	}
	defer f.Close()
	return e.captureInbound(p, cookie, f)
}

func workloadInfo(ref PodRef) zds.WorkloadInfo {
	return zds.WorkloadInfo{Name: ref.Name, Namespace: ref.Namespace, ServiceAccount: ref.ServiceAccount}
}

// EnrollPathHandedOff is EnrollPath for a caller that must know ztunnel
// took the pod, such as the CNI plugin's ADD, which fails closed: it hands
// the netns to ztunnel and waits for the ack (at most HandoffTimeout), and
// only then redirects it. When the hand-off fails it returns why
// (zds.ErrNoZtunnel, a *zds.AckError, a timeout) and leaves the netns out
// of the redirect map; the pod stays wanted, and the ZDS server keeps it
// for the next snapshot until it is forgotten. Without a hand-off it is
// EnrollPath. It is EnrolNetns for a path.
func (e *Enroller) EnrollPathHandedOff(ref PodRef, netnsPath string) error {
	f, err := os.Open(netnsPath)
	if err != nil {
		return fmt.Errorf("open the pod's network namespace: %w", err)
	}
	defer f.Close()
	return e.EnrolNetns(context.Background(), ref, f)
}

// handOff gives ztunnel the pod's netns and waits for its ack.
func (e *Enroller) handOff(p *podState, cookie uint64, netnsPath string) error {
	if e.handoff == nil {
		return nil
	}
	f, err := os.Open(netnsPath)
	if err != nil {
		e.log.Error(err, "Opening the pod's network namespace for ztunnel failed", "pod", p.ref.String())
		return err
	}
	defer f.Close()
	return e.handOffFile(p, cookie, f)
}

// handOffFile is handOff for a netns already open (the CNI plugin passes
// its fd).
func (e *Enroller) handOffFile(p *podState, cookie uint64, f *os.File) error {
	if e.handoff == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), HandoffTimeout)
	defer cancel()
	err := e.handoff.AddWorkload(ctx, p.ref.UID, f, workloadInfo(p.ref))
	switch {
	case err == nil:
		e.log.V(1).Info("Pod handed to ztunnel", "pod", p.ref.String())
	case errors.Is(err, zds.ErrNoZtunnel):
		e.log.Info("No ztunnel connected; the pod goes into the next ztunnel's snapshot", "pod", p.ref.String())
	default:
		e.log.Error(err, "Handing the pod to ztunnel failed; it is redirected all the same and goes into the next snapshot", "pod", p.ref.String())
	}
	// Recorded by the server either way: the next snapshot carries it.
	p.handedOff = cookie
	return err
}

func (e *Enroller) handoffDelete(uid, what string) {
	if e.handoff == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), HandoffTimeout)
	defer cancel()
	if err := e.handoff.DelWorkload(ctx, uid); err != nil {
		e.log.Error(err, "Telling ztunnel a pod is gone failed", "pod", what)
	}
}

// retire unenrolls a namespace the pod no longer uses and keeps its counts,
// so the pod's counters stay monotonic.
func (e *Enroller) retire(p *podState, cookie uint64) {
	last, err := e.maps.UnenrollNetns(cookie)
	if err != nil {
		e.log.Error(err, "Unenrolling replaced namespace failed", "pod", p.ref.String())
		return
	}
	addEntry(&p.retired, &last)
	delete(p.cookies, cookie)
}

func addEntry(dst, src *NetnsEntry) {
	for i := range dst.Results {
		dst.Results[i] += src.Results[i]
	}
	dst.LatencySumNs += src.LatencySumNs
	for i := range dst.LatencyBuckets {
		dst.LatencyBuckets[i] += src.LatencyBuckets[i]
	}
}

// PodTelemetry is one enrolled pod's L4 telemetry.
type PodTelemetry struct {
	Pod     PodRef
	Netns   int // enrolled network namespaces (normally 1)
	Metrics NetnsEntry
}

// Telemetry returns every wanted pod's telemetry, enrolled or not yet.
func (e *Enroller) Telemetry() ([]PodTelemetry, error) {
	entries, err := e.maps.EnrolledNetns()
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]PodTelemetry, 0, len(e.pods))
	for _, p := range e.pods {
		t := PodTelemetry{Pod: p.ref, Metrics: p.retired}
		for c := range p.cookies {
			if v, ok := entries[c]; ok {
				addEntry(&t.Metrics, &v)
				t.Netns++
			}
		}
		out = append(out, t)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Pod.String() < out[j].Pod.String() })
	return out, nil
}

// Cookies returns the enrolled netns cookies of a pod.
func (e *Enroller) Cookies(uid string) []uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	p, ok := e.pods[uid]
	if !ok {
		return nil
	}
	out := make([]uint64, 0, len(p.cookies))
	for c := range p.cookies {
		out = append(out, c)
	}
	return out
}

// EnrolledPods counts pods with at least one enrolled namespace.
func (e *Enroller) EnrolledPods() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for _, p := range e.pods {
		if len(p.cookies) > 0 {
			n++
		}
	}
	return n
}

// PodWaiting is a wanted pod that is not enrolled: no network namespace of
// it is redirected yet, or ztunnel has not taken it (then its traffic is
// redirected to a ztunnel that is not listening there, and fails).
type PodWaiting struct {
	Pod PodRef
	// Since is when it started waiting: when it was wanted, or when
	// ztunnel lost or refused it.
	Since time.Time
	// Reason says why it is not enrolled, for the MeshNode.
	Reason string
}

// HandoffState is a Handoff that knows whether ztunnel has taken each
// workload (*zds.Server).
type HandoffState interface {
	State(uid string) zds.WorkloadState
}

// Why a pod is not enrolled, besides ztunnel's reasons (zds.Reason*).
const (
	ReasonNoNetns      = "its network namespace is not found yet"
	ReasonNotHandedOff = "not handed to ztunnel yet"
)

// Enrolment counts the wanted pods and the enrolled ones, and returns the
// wanted pods not enrolled, the longest waiting first. With a hand-off to
// ztunnel a pod is enrolled only once its netns is redirected and the
// newest ztunnel took it (acked): a pod ztunnel refused, or one waiting
// while no ztunnel is connected, is listed with the reason.
func (e *Enroller) Enrolment() (wanted, enrolled int, waiting []PodWaiting) {
	e.mu.Lock()
	defer e.mu.Unlock()
	states, _ := e.handoff.(HandoffState)
	for _, p := range e.pods {
		w := PodWaiting{Pod: p.ref, Since: p.since, Reason: ReasonNoNetns}
		var st zds.WorkloadState
		if states != nil {
			st = states.State(p.ref.UID)
		}
		switch {
		case len(p.cookies) > 0 && (states == nil || st.Handed):
			enrolled++
			continue
		case st.Known && !st.Handed:
			// Redirected or not (the CNI path redirects only what
			// ztunnel took), ztunnel's answer is the reason.
			w.Reason = st.Reason
			if st.Since.After(w.Since) {
				w.Since = st.Since
			}
		case len(p.cookies) > 0:
			w.Reason = ReasonNotHandedOff
		}
		waiting = append(waiting, w)
	}
	sort.Slice(waiting, func(i, j int) bool {
		a, b := waiting[i], waiting[j]
		if !a.Since.Equal(b.Since) {
			return a.Since.Before(b.Since)
		}
		return a.Pod.String() < b.Pod.String()
	})
	return len(e.pods), enrolled, waiting
}
