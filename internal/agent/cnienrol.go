package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/meshkeeper/meshkeeper/internal/agent/cni"
)

// PodEnroller is the one hook CNI-time enrolment calls once it has decided
// that a new pod is meshed. EnrolNetns must return only when the pod's
// traffic is redirected (and, with the ZDS hand-off, ztunnel has taken the
// namespace), or an error: the pod's sandbox start waits on it, and an
// error fails the sandbox (the kubelet retries). ReleaseNetns is called on
// the sandbox's teardown; netns may be nil when the namespace is already
// gone. netns is an open nsfs file the caller closes after the call.
// Enroller implements it (the datapath's enrolled map); the ZDS hand-off
// wraps it.
type PodEnroller interface {
	EnrolNetns(ctx context.Context, pod PodRef, netns *os.File) error
	ReleaseNetns(ctx context.Context, pod PodRef, netns *os.File) error
}

// EnrolNetns enrols a pod's network namespace given as an open file, at
// once and failing closed: ztunnel takes it (acked), then it is redirected
// and its inbound captured; an error leaves it out of the redirect map.
func (e *Enroller) EnrolNetns(_ context.Context, ref PodRef, netns *os.File) error {
	cookie, err := fileNetnsCookie(netns)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	p := e.podLocked(ref)
	p.ref, p.explicit = ref, true
	if cookie == e.hostCookie {
		return fmt.Errorf("pod %s: refusing to enroll the host network namespace", p.ref)
	}
	// Fail closed: the sandbox starts only once
	// ztunnel has taken the namespace, so its first connection finds
	// ztunnel's in-pod listener; otherwise the ADD fails and the kubelet
	// retries.
	if err := e.handOffFile(p, cookie, netns); err != nil {
		return fmt.Errorf("pod %s: hand-off to ztunnel: %w", ref, err)
	}
	if err := e.redirect(p, cookie); err != nil {
		return err
	}
	// ztunnel listens in the netns now (it acked): its inbound listener
	// is in the capture map already.
	if err := e.captureInbound(p, cookie, netns); err != nil {
		return fmt.Errorf("pod %s: capture inbound: %w", ref, err)
	}
	return nil
}

// ReleaseNetns unenrols one network namespace of a pod: its sandbox was
// torn down, after every container of it stopped. It keeps the pod's
// counts; the pod stays wanted until it is deleted, and a pod already
// deleted (Gone) is forgotten once no namespace of it is left. Without
// netns (the namespace is already gone, so nothing in it can connect) a
// deleted pod is forgotten, and a pod that still exists keeps what it has
// until a full scan finds no process in it.
func (e *Enroller) ReleaseNetns(_ context.Context, ref PodRef, netns *os.File) error {
	if netns == nil {
		e.mu.Lock()
		defer e.mu.Unlock()
		if p, ok := e.pods[ref.UID]; ok && p.gone {
			e.forgetLocked(ref.UID, p)
		}
		return nil
	}
	cookie, err := fileNetnsCookie(netns)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if p, ok := e.pods[ref.UID]; ok {
		if _, ok := p.cookies[cookie]; ok {
			e.retire(p, cookie)
		}
		if p.gone && len(p.cookies) == 0 {
			e.forgetLocked(ref.UID, p)
		}
	}
	return nil
}

// netnsEnrolled says whether netns is enrolled for the pod.
func (e *Enroller) netnsEnrolled(uid string, netns *os.File) (bool, error) {
	cookie, err := fileNetnsCookie(netns)
	if err != nil {
		return false, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	p, ok := e.pods[uid]
	if !ok {
		return false, nil
	}
	_, ok = p.cookies[cookie]
	return ok, nil
}

// fileNetnsCookie is NetnsCookie for an open namespace file.
func fileNetnsCookie(f *os.File) (uint64, error) {
	type result struct {
		cookie uint64
		err    error
	}
	ch := make(chan result, 1)
	go func() {
		// Never unlocked: the thread leaves the host network namespace
		// and must die with this goroutine.
		runtime.LockOSThread()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("netns cookie: setns: %w", err)}
			return
		}
		c, err := socketNetnsCookie()
		ch <- result{c, err}
	}()
	r := <-ch
	return r.cookie, r.err
}

// CNIHandler answers the CNI plugin: it decides from the pod watcher's
// caches (or the API server, for a pod the cache has not seen yet) whether
// a pod is meshed, and enrols it through the PodEnroller before answering.
type CNIHandler struct {
	Pods     *PodWatcher
	Enroller PodEnroller
	Log      logr.Logger
}

// podCacheWait is how long a request waits for a new pod to reach the
// watcher's cache before the pod is read from the API server.
const podCacheWait = 500 * time.Millisecond

// Handle implements cni.Handler.
func (h *CNIHandler) Handle(ctx context.Context, req cni.Request, netns *os.File) cni.Response {
	began := time.Now()
	resp := h.handle(ctx, req, netns)
	observeCNI(string(req.Command), string(resp.Result), time.Since(began))
	log := h.Log.WithValues("command", req.Command, "pod", req.Namespace+"/"+req.Name, "result", resp.Result, "took", time.Since(began).Round(time.Microsecond).String())
	switch {
	case resp.Result == cni.ResultError:
		log.Error(errors.New(resp.Message), "CNI request failed")
	case req.Command == cni.CommandAdd:
		log.Info("CNI request", "message", resp.Message)
	default:
		log.V(1).Info("CNI request", "message", resp.Message)
	}
	return resp
}

func (h *CNIHandler) handle(ctx context.Context, req cni.Request, netns *os.File) cni.Response {
	fail := func(format string, args ...any) cni.Response {
		return cni.Response{Result: cni.ResultError, Message: fmt.Sprintf(format, args...)}
	}
	switch req.Command {
	case cni.CommandDel:
		ref := PodRef{Namespace: req.Namespace, Name: req.Name, UID: req.UID}
		if err := h.Enroller.ReleaseNetns(ctx, ref, netns); err != nil {
			return fail("release the network namespace: %v", err)
		}
		return cni.Response{Result: cni.ResultEnrolled, Message: "released"}
	case cni.CommandAdd, cni.CommandCheck:
	default:
		return fail("unknown command %q", req.Command)
	}
	if netns == nil {
		return fail("no network namespace fd came with the %s request", req.Command)
	}
	ref, want, why, err := h.Pods.decide(ctx, req.Namespace, req.Name, req.UID)
	if err != nil {
		return fail("cannot tell whether the pod is meshed: %v", err)
	}
	if !want {
		return cni.Response{Result: cni.ResultSkipped, Message: why}
	}
	if req.Command == cni.CommandCheck {
		e, ok := h.Enroller.(interface {
			netnsEnrolled(string, *os.File) (bool, error)
		})
		if !ok {
			return cni.Response{Result: cni.ResultEnrolled}
		}
		enrolled, err := e.netnsEnrolled(ref.UID, netns)
		if err != nil {
			return fail("%v", err)
		}
		if !enrolled {
			return fail("the pod is meshed but its network namespace is not enrolled")
		}
		return cni.Response{Result: cni.ResultEnrolled}
	}
	if err := h.Enroller.EnrolNetns(ctx, ref, netns); err != nil {
		return fail("enrol: %v", err)
	}
	return cni.Response{Result: cni.ResultEnrolled}
}

// decide says whether the pod is to be meshed, from the watcher's caches;
// a pod not in the cache yet (the sandbox can start before the agent's
// watch delivers the pod) is waited for briefly, then read from the API
// server. It fails (so the ADD fails closed) when it cannot tell.
func (w *PodWatcher) decide(ctx context.Context, namespace, name, uid string) (ref PodRef, want bool, why string, err error) {
	select {
	case <-w.syncedCh():
	case <-ctx.Done():
		return ref, false, "", errors.New("the agent's pod and namespace caches are not synced yet")
	}
	enrolled, revision := w.namespace(namespace)
	ref = PodRef{Namespace: namespace, Name: name, UID: uid, Revision: revision}
	if !enrolled {
		return ref, false, fmt.Sprintf("namespace %s is not in the mesh (%s)", namespace, w.NamespaceSelector), nil
	}
	pod, err := w.lookupPod(ctx, namespace, name, uid)
	if err != nil {
		return ref, false, "", err
	}
	if ref.UID == "" {
		ref.UID = string(pod.UID)
	}
	if !WantPod(pod, true) {
		return ref, false, "the pod is not meshed (host network, finished, or labelled " + optOutLabel + "=none)", nil
	}
	return ref, true, "", nil
}

func (w *PodWatcher) lookupPod(ctx context.Context, namespace, name, uid string) (*corev1.Pod, error) {
	match := func(p *corev1.Pod) bool { return uid == "" || string(p.UID) == uid }
	waitUntil := time.Now().Add(podCacheWait)
	for {
		obj, exists, _ := w.pods.GetStore().GetByKey(namespace + "/" + name)
		if p, ok := obj.(*corev1.Pod); ok && exists && match(p) {
			return p, nil
		}
		if time.Now().After(waitUntil) {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("pod %s/%s: %w", namespace, name, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	p := &corev1.Pod{}
	if err := w.Client.Get().Namespace(namespace).Resource("pods").Name(name).Do(ctx).Into(p); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("pod %s/%s does not exist", namespace, name)
		}
		return nil, fmt.Errorf("read pod %s/%s: %w", namespace, name, err)
	}
	if !match(p) {
		return nil, fmt.Errorf("pod %s/%s has UID %s, the sandbox is for %s", namespace, name, p.UID, uid)
	}
	return p, nil
}
