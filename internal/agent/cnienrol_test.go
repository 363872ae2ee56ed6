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
