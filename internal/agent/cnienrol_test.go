package agent

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/go-logr/logr/testr"
	. "github.com/onsi/gomega"

	"github.com/meshkeeper/meshkeeper/internal/agent/cni"
)

// TestCNIAddEnrolsTheNetnsItWasGiven: the plugin's ADD, through the agent's
// socket with the namespace's fd, puts exactly that namespace's cookie in
// the datapath's map before it returns; DEL takes it out again and keeps
// the pod wanted; an agent that stopped serving makes the next ADD fail.
func TestCNIAddEnrolsTheNetnsItWasGiven(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	dp, _ := loadTestDatapath(t, capturePort)
	enroller, err := NewEnroller(dp, "", testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	podNS := newTestNetns(t)
	pod := PodRef{Namespace: "shop", Name: "web-0", UID: "5b4c3d2e-1f0a-4b9c-8d7e-6f5a4b3c2d1e"}

	// The handler as the agent's, minus the API lookup: the pod is meshed.
	h := cni.HandlerFunc(func(ctx context.Context, req cni.Request, netns *os.File) cni.Response {
		ref := PodRef{Namespace: req.Namespace, Name: req.Name, UID: req.UID}
		switch req.Command {
		case cni.CommandAdd:
			if err := enroller.EnrolNetns(ctx, ref, netns); err != nil {
				return cni.Response{Result: cni.ResultError, Message: err.Error()}
			}
		case cni.CommandDel:
			if err := enroller.ReleaseNetns(ctx, ref, netns); err != nil {
				return cni.Response{Result: cni.ResultError, Message: err.Error()}
			}
		}
		return cni.Response{Result: cni.ResultEnrolled}
	})
	sock := filepath.Join(t.TempDir(), "cni.sock")
	ctx, cancel := context.WithCancel(context.Background())
	stop, err := startCNI(ctx, CNIOptions{Socket: sock}, h, testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	defer cancel()

	conf := cni.PluginConf{Socket: sock, Timeout: "2s"}
	cp := cni.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID}
	_, err = cni.PluginAdd(context.Background(), conf, cp, "sandbox-1", podNS.Path)
	g.Expect(err).NotTo(HaveOccurred())
	entries, err := dp.EnrolledNetns()
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(entries).To(HaveKey(podNS.Cookie(t)), "enrolled when ADD returned")
	g.Expect(PodUIDOf(new(entries[podNS.Cookie(t)]))).To(Equal(pod.UID))
	g.Expect(enroller.Cookies(pod.UID)).To(ConsistOf(podNS.Cookie(t)))

	cni.PluginDel(context.Background(), conf, cp, "sandbox-1", podNS.Path)
	g.Expect(dp.EnrolledNetns()).To(BeEmpty())
	wanted, _, _ := enroller.Enrolment()
	g.Expect(wanted).To(Equal(1), "still wanted until the pod is deleted")

	stop()
	_, err = cni.PluginAdd(context.Background(), conf, cp, "sandbox-2", podNS.Path)
	g.Expect(err).To(MatchError(cni.ErrAgentUnreachable))
	_, err = os.Stat(sock)
	g.Expect(os.IsNotExist(err)).To(BeTrue(), "the socket is removed when the agent stops")
	enroller.Forget(pod.UID)
}

// TestDeletedPodStaysEnrolledUntilItsSandboxIsGone: a pod deleted from the
// API server while its containers still run (a zero grace period) keeps
// its redirection until its sandbox is gone, so its last connections still
// go through ztunnel: its CNI DEL releases it (the runtime sends it after
// every container stopped), and a pod found by the /proc scan is released
// by the first full scan that finds none of its processes. A deleted pod
// with nothing enrolled is forgotten at once.
func TestDeletedPodStaysEnrolledUntilItsSandboxIsGone(t *testing.T) {
	requirePrivileged(t)
	g := NewWithT(t)
	dp, _ := loadTestDatapath(t, capturePort)
	enroller, err := NewEnroller(dp, "", testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	ctx := context.Background()
	podNS := newTestNetns(t)
	nsFile, err := os.Open(podNS.Path)
	g.Expect(err).NotTo(HaveOccurred())
	defer nsFile.Close()
	enrolled := func() []uint64 {
		entries, err := dp.EnrolledNetns()
		g.Expect(err).NotTo(HaveOccurred())
		var out []uint64
		for c := range entries {
			out = append(out, c)
		}
		return out
	}

	// Released by its CNI DEL, with the namespace.
	web := PodRef{Namespace: "shop", Name: "web-0", UID: "6c5d4e3f-2a1b-4c0d-9e8f-7a6b5c4d3e2f"}
	g.Expect(enroller.EnrolNetns(ctx, web, nsFile)).To(Succeed())
	enroller.Gone(web.UID)
	g.Expect(enrolled()).To(ConsistOf(podNS.Cookie(t)), "deleted from the API server, its containers still run: still redirected")
	wanted, n, _ := enroller.Enrolment()
	g.Expect([]int{wanted, n}).To(Equal([]int{1, 1}))
	g.Expect(enroller.ReleaseNetns(ctx, web, nsFile)).To(Succeed())
	g.Expect(enrolled()).To(BeEmpty(), "its sandbox is gone")
	wanted, _, _ = enroller.Enrolment()
	g.Expect(wanted).To(BeZero(), "a deleted pod whose sandbox is gone is forgotten")

	// Released by a CNI DEL that comes without the namespace (gone already).
	g.Expect(enroller.EnrolNetns(ctx, web, nsFile)).To(Succeed())
	enroller.Gone(web.UID)
	g.Expect(enrolled()).To(HaveLen(1))
	g.Expect(enroller.ReleaseNetns(ctx, web, nil)).To(Succeed())
	g.Expect(enrolled()).To(BeEmpty())
	wanted, _, _ = enroller.Enrolment()
	g.Expect(wanted).To(BeZero())

	// A pod deleted before anything of it was enrolled: forgotten at once.
	pending := PodRef{Namespace: "shop", Name: "pending", UID: "7d6e5f4a-3b2c-4d1e-8f9a-0b1c2d3e4f5a"}
	enroller.Want(pending)
	enroller.Gone(pending.UID)
	wanted, _, _ = enroller.Enrolment()
	g.Expect(wanted).To(BeZero())

	// Found by the /proc scan (no CNI DEL will come for it): released by
	// the first full scan after its last process exited.
	cgroups := newPodCgroups(t)
	scanned := PodRef{Namespace: "shop", Name: "scanned", UID: "8e7f6a5b-4c3d-4e2f-9a0b-1c2d3e4f5a6b"}
	enroller.Want(scanned)
	proc := cgroups.start(t, scanned.UID, false)
	cookie, err := NetnsCookie(proc.netnsPath())
	g.Expect(err).NotTo(HaveOccurred())
	enroller.Sync(true)
	g.Expect(enroller.Cookies(scanned.UID)).To(ConsistOf(cookie))
	enroller.Gone(scanned.UID)
	enroller.Sync(true)
	g.Expect(enrolled()).To(ConsistOf(cookie), "its process still runs: still redirected")
	proc.stop()
	enroller.Sync(true)
	g.Expect(enrolled()).To(BeEmpty(), "no process left in its namespace")
	wanted, _, _ = enroller.Enrolment()
	g.Expect(wanted).To(BeZero())
}
