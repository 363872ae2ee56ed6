package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// NodeRedirection is the redirection a node gets, also the value of the
// meshkeeper.dev/redirection node label.
// +kubebuilder:validation:Enum=ebpf;iptables;blocked
type NodeRedirection string

const (
	NodeRedirectionEBPF     NodeRedirection = "ebpf"
	NodeRedirectionIPTables NodeRedirection = "iptables"
	NodeRedirectionBlocked  NodeRedirection = "blocked"
)

// FeatureProbe is the result of probing one kernel feature.
type FeatureProbe struct {
	// Name of the feature, e.g. "prog/cgroup_sock_addr" or "helper/get_netns_cookie".
	Name string `json:"name"`
	// Supported is true when the kernel has it.
	Supported bool `json:"supported"`
	// Error is why the probe failed, when it did.
	// +optional
	Error string `json:"error,omitempty"`
}

// MeshNodeStatus is one node's preflight result, written by its node agent.
type MeshNodeStatus struct {
	// KernelRelease is uname -r.
	// +optional
	KernelRelease string `json:"kernelRelease,omitempty"`
	// BTF is true when /sys/kernel/btf/vmlinux exists.
	BTF bool `json:"btf"`
	// CgroupV2 is true when a cgroup2 hierarchy is mounted.
	CgroupV2 bool `json:"cgroupV2"`
	// CgroupV2Path is where cgroup2 is mounted (hybrid hosts use /sys/fs/cgroup/unified).
	// +optional
	CgroupV2Path string `json:"cgroupV2Path,omitempty"`
	// BPFFS is true when a bpf filesystem is mounted at /sys/fs/bpf.
	BPFFS bool `json:"bpffs"`
	// Features are the program, map and helper probes.
	// +listType=map
	// +listMapKey=name
	// +optional
	Features []FeatureProbe `json:"features,omitempty"`
	// Eligible is true when the node can run eBPF redirection.
	Eligible bool `json:"eligible"`
	// Redirection chosen for this node.
	// +optional
	Redirection NodeRedirection `json:"redirection,omitempty"`
	// Reason explains an ineligible node, e.g. "kernel 5.4.0 < 5.10 required".
	// +optional
	Reason string `json:"reason,omitempty"`
	// AgentVersion is the node agent that wrote this report.
	// +optional
	AgentVersion string `json:"agentVersion,omitempty"`
	// ProbedAt is when the probes ran.
	// +optional
	ProbedAt *metav1.Time `json:"probedAt,omitempty"`
	// Enrolment is how many of this node's pods the agent wants redirected
	// and how many it has enrolled; absent until the datapath runs.
	// +optional
	Enrolment *NodeEnrolment `json:"enrolment,omitempty"`
}

// MaxNotEnrolledPods bounds NodeEnrolment.NotEnrolled.
const MaxNotEnrolledPods = 20

// NodeEnrolment counts a node's wanted and enrolled pods. A wanted pod is one
// in a namespace of the Mesh's dataplane that runs on the node without host
// network; it is enrolled once its network namespace is in the datapath.
type NodeEnrolment struct {
	// Wanted pods on this node.
	Wanted int32 `json:"wanted"`
	// Enrolled pods: wanted pods whose network namespace is redirected.
	Enrolled int32 `json:"enrolled"`
	// NotEnrolled lists wanted pods not enrolled, the longest waiting first.
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=20
	// +optional
	NotEnrolled []PodNotEnrolled `json:"notEnrolled,omitempty"`
	// NotEnrolledOmitted counts wanted pods not enrolled that NotEnrolled
	// leaves out.
	// +optional
	NotEnrolledOmitted int32 `json:"notEnrolledOmitted,omitempty"`
	// ObservedAt is when the agent counted.
	// +optional
	ObservedAt *metav1.Time `json:"observedAt,omitempty"`
}

// PodNotEnrolled is a wanted pod whose network namespace is not redirected.
type PodNotEnrolled struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Since is when it started waiting: when the agent started wanting
	// it, or when ztunnel lost or refused it.
	Since metav1.Time `json:"since"`
	// Reason says why it is not enrolled: its network namespace is not
	// found yet, "no ztunnel connected" (its traffic is redirected to a
	// ztunnel that is not there), "ztunnel refused: <ztunnel's error>", ...
	// +optional
	Reason string `json:"reason,omitempty"`
}

// MeshNode is one node's kernel preflight result. It has no spec: the node
// agent on the node of the same name writes its status.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,categories=meshkeeper
// +kubebuilder:printcolumn:name="Kernel",type=string,JSONPath=`.status.kernelRelease`
// +kubebuilder:printcolumn:name="BTF",type=boolean,JSONPath=`.status.btf`
// +kubebuilder:printcolumn:name="Eligible",type=boolean,JSONPath=`.status.eligible`
// +kubebuilder:printcolumn:name="Redirection",type=string,JSONPath=`.status.redirection`
// +kubebuilder:printcolumn:name="Wanted",type=integer,JSONPath=`.status.enrolment.wanted`
// +kubebuilder:printcolumn:name="Enrolled",type=integer,JSONPath=`.status.enrolment.enrolled`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.reason`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type MeshNode struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +optional
	Status MeshNodeStatus `json:"status,omitempty"`
}

// MeshNodeList is a list of MeshNode.
// +kubebuilder:object:root=true
type MeshNodeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []MeshNode `json:"items"`
}

func init() {
	SchemeBuilder.Register(&MeshNode{}, &MeshNodeList{})
}
