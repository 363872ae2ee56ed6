{{/* node-agent.securityContext: root with exactly the capabilities eBPF
redirection needs, never privileged. */}}
{{- define "node-agent.securityContext" -}}
privileged: false
# CAP_BPF and CAP_SYS_ADMIN imply it; say so rather than pretend otherwise.
allowPrivilegeEscalation: true
readOnlyRootFilesystem: true
# bpffs and the cgroup2 root are root-owned on the host.
runAsUser: 0
runAsNonRoot: false
capabilities:
  drop: [ALL]
  add:
  - BPF           # load programs, create maps
  - PERFMON       # tracing-style helpers and sockops telemetry
  - NET_ADMIN     # cgroup/sock_addr and sockops attachment
  - SYS_ADMIN     # pin to bpffs, attach at the cgroup2 root, netns cookies
  {{- if .Values.memlockCapability }}
  - SYS_RESOURCE  # raise RLIMIT_MEMLOCK on older kernels
  {{- end }}
  - SYS_PTRACE    # open pods' /host/proc/<pid>/ns/net (processes of other users or capabilities)
{{- end }}

{{/* node-agent.volumeMounts: the host paths the agent works on. */}}
{{- define "node-agent.volumeMounts" -}}
# Pins live on the host's bpffs so they outlive the pod. HostToContainer, not
# Bidirectional: the API server only allows Bidirectional propagation for
# privileged containers, and the host (systemd) mounts bpffs at /sys/fs/bpf;
# the agent's preflight fails a node where it is not mounted.
- name: bpffs
  mountPath: /sys/fs/bpf
  mountPropagation: HostToContainer
- name: cgroup
  mountPath: /sys/fs/cgroup
  readOnly: true
- name: host-proc
  mountPath: /host/proc
  readOnly: true
{{- if or .Values.cni.enabled .Values.cleanup }}
# The node's CNI directories: the agent installs (and the cleanup removes)
# its chained plugin there.
- name: cni-bin
  mountPath: /host/opt/cni/bin
- name: cni-conf
  mountPath: /host/etc/cni/net.d
{{- end }}
{{- if and .Values.cni.enabled (not .Values.cleanup) }}
# The plugin, a host process, reaches the agent through this socket.
- name: cni-socket
  mountPath: /var/run/meshkeeper
{{- end }}
{{- end }}

{{/* node-agent.cniArgs: where the agent finds the node's CNI. */}}
{{- define "node-agent.cniArgs" -}}
- --cni-conf-dir=/host/etc/cni/net.d
- --cni-bin-dir=/host/opt/cni/bin
{{- end }}

{{/* node-agent.zdsMount: the directory of the ZDS socket, shared with
ztunnel's DaemonSet (its cni-ztunnel-sock-dir volume). */}}
{{- define "node-agent.zdsMount" -}}
- name: ztunnel-sock-dir
  mountPath: /var/run/ztunnel
{{- end }}
