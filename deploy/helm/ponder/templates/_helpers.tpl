{{/* Names are cut to 40 characters: KubeRay appends suffixes to the RayCluster and its Services. */}}
{{- define "ponder.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "ponder.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ponder.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ponder.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ponder.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ponder.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* A key of a map, or a default when the key is absent (Helm's `default` would also replace 0 and false). */}}
{{- define "ponder.get" -}}
{{- $m := index . 0 | default dict }}{{ $k := index . 1 }}
{{- if hasKey $m $k }}{{ index $m $k }}{{ else }}{{ index . 2 }}{{ end }}
{{- end }}

{{/* Paths the chart owns inside the pods; cluster/helm.py uses the same ones. */}}
{{- define "ponder.apiKeysFile" -}}/etc/ponder/api-keys/keys.yaml{{- end }}
{{- define "ponder.tiersFile" -}}/etc/ponder/config/tiers.yaml{{- end }}
{{- define "ponder.chatTemplateFile" -}}/etc/ponder/config/chat_template.jinja{{- end }}
{{/* The config ConfigMap (tiers, chat template) exists and is mounted: "true" or "". */}}
{{- define "ponder.configEnabled" -}}{{ if or .Values.tiers .Values.chatTemplate }}true{{ end }}{{- end }}

{{- define "ponder.apiKeysEnabled" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys }}true{{ end }}
{{- end }}

{{- define "ponder.apiKeysSecret" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "ponder.fullname" .)) }}
{{- end }}

{{/* The Serve builder's args: the app config as given, plus the two paths the chart owns
     (mirrored by cluster/helm.py builder_args). */}}
{{- define "ponder.builderArgs" -}}
{{- $app := deepCopy .Values.app }}
{{- if include "ponder.apiKeysEnabled" . }}
{{- if not (hasKey $app "auth") }}{{ $_ := set $app "auth" dict }}{{ end }}
{{- $_ := set $app.auth "api_keys_file" (include "ponder.apiKeysFile" .) }}
{{- end }}
{{- if .Values.tiers }}
{{- if not (hasKey $app "depth_control") }}{{ $_ := set $app "depth_control" dict }}{{ end }}
{{- $_ := set $app.depth_control "tiers_file" (include "ponder.tiersFile" .) }}
{{- end }}
{{- if .Values.chatTemplate }}
{{- if not (hasKey $app "engine") }}{{ $_ := set $app "engine" dict }}{{ end }}
{{- $_ := set $app.engine "chat_template" (include "ponder.chatTemplateFile" .) }}
{{- end }}
{{- toYaml (dict "app" $app) }}
{{- end }}

{{/* serveConfigV2: what services.app.serve_config says for the same config (tests compare them).
     Defaults below are AppConfig's. */}}
{{- define "ponder.serveConfig" -}}
{{- $app := .Values.app }}
{{- $w := $app.worker | default dict }}
{{- $r := $app.router | default dict }}
{{- $kv := $app.kvstore | default dict }}
http_options:
  host: 0.0.0.0
  port: {{ include "ponder.httpPort" . }}
applications:
  - name: {{ include "ponder.get" (list $app "app_name" "ponder") }}
    route_prefix: /
    import_path: services.app:app_builder
    args:
      {{- include "ponder.builderArgs" . | nindent 6 }}
    deployments:
      - name: ReasoningWorker
        num_replicas: {{ include "ponder.get" (list $w "num_replicas" 1) }}
        max_ongoing_requests: {{ include "ponder.get" (list $w "max_ongoing_requests" 32) }}
        ray_actor_options:
          num_cpus: {{ include "ponder.get" (list $w "num_cpus" 1.0) }}
          num_gpus: {{ include "ponder.get" (list $w "num_gpus" 0.0) }}
        {{- if and (eq (include "ponder.get" (list $kv "enabled" false)) "true") (eq (include "ponder.get" (list $kv "affinity" true)) "true") }}
        request_router_config:
          request_router_class: services.worker.affinity:SessionAffinityRouter
          request_router_kwargs:
            max_queue: {{ include "ponder.get" (list $kv "affinity_max_queue" 4) }}
        {{- end }}
      - name: Router
        num_replicas: {{ include "ponder.get" (list $r "num_replicas" 1) }}
        ray_actor_options:
          num_cpus: {{ include "ponder.get" (list $r "num_cpus" 0.25) }}
{{- end }}

{{- define "ponder.httpPort" -}}
{{- include "ponder.get" (list (.Values.app.http | default dict) "port" 8000) }}
{{- end }}

{{- define "ponder.metricsPort" -}}
{{- include "ponder.get" (list (.Values.app.ray | default dict) "metrics_export_port" 8080) }}
{{- end }}

{{- define "ponder.kvEnabled" -}}
{{- if eq (include "ponder.get" (list (.Values.app.kvstore | default dict) "enabled" false)) "true" }}true{{ end }}
{{- end }}

{{/* The KV shard's NIXL progress thread busy-polls a core (docs/kvstore.md): one CPU more per pod. */}}
{{- define "ponder.shardCpus" -}}
{{- if and (include "ponder.kvEnabled" .) (eq (include "ponder.get" (list .Values.app.kvstore "transport" "nixl")) "nixl") }}1{{ else }}0{{ end }}
{{- end }}

{{/* Pod memory in MiB: the processes' share, /dev/shm (tmpfs counts against the limit), the shard's RAM. */}}
{{- define "ponder.memoryMi" -}}
{{- $ctx := index . 0 }}{{- $g := index . 1 -}}
{{- $mi := add (mul $g.memoryGiB 1024) (mul $g.shmGiB 1024) }}
{{- if include "ponder.kvEnabled" $ctx }}
{{- $ram := 268435456 }}{{/* AppConfig's default; read as a number: printed, a float64 turns 1.3e+11 */}}
{{- if hasKey $ctx.Values.app.kvstore "ram_bytes" }}{{ $ram = $ctx.Values.app.kvstore.ram_bytes | int64 }}{{ end }}
{{- $mi = add $mi (div (add $ram 1048575) 1048576) }}
{{- end }}
{{- printf "%dMi" (int64 $mi) }}
{{- end }}

{{- define "ponder.ucxTls" -}}
{{- $n := .Values.network }}
{{- if $n.ucxTls }}{{ $n.ucxTls }}
{{- else if eq $n.transport "infiniband" }}rc,ud,sm,self,cuda_copy,cuda_ipc,gdr_copy
{{- else if eq $n.transport "roce" }}rc,sm,self,cuda_copy,cuda_ipc,gdr_copy
{{- else }}tcp,sm,self
{{- end }}
{{- end }}

{{/* Environment of every Ray container (Ray workers and vLLM's engine processes inherit it). */}}
{{- define "ponder.env" -}}
- name: PONDER_HOME
  value: /var/lib/ponder
- name: UCX_TLS
  value: {{ include "ponder.ucxTls" . | quote }}
{{- with .Values.network.netDevices }}
- name: UCX_NET_DEVICES
  value: {{ . | quote }}
{{- end }}
{{- if ne .Values.network.gidIndex nil }}
- name: UCX_IB_GID_INDEX
  value: {{ .Values.network.gidIndex | int | quote }}
{{- end }}
{{- range $k, $v := .Values.network.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end }}

{{- define "ponder.volumeMounts" -}}
- name: shm
  mountPath: /dev/shm
- name: models
  mountPath: /var/lib/ponder/models
{{- if .Values.kvDisk.enabled }}
- name: kv-disk
  mountPath: {{ .Values.kvDisk.mountPath }}
{{- end }}
{{- if include "ponder.configEnabled" . }}
- name: config
  mountPath: /etc/ponder/config
  readOnly: true
{{- end }}
{{- if include "ponder.apiKeysEnabled" . }}
- name: api-keys
  mountPath: /etc/ponder/api-keys
  readOnly: true
{{- end }}
{{- end }}

{{- define "ponder.volumes" -}}
{{- $ctx := index . 0 }}{{- $g := index . 1 -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ printf "%dGi" (int $g.shmGiB) }}
- name: models
  {{- with $ctx.Values.model.volume }}
  {{- toYaml . | nindent 2 }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- if $ctx.Values.kvDisk.enabled }}
- name: kv-disk
  {{- if $ctx.Values.kvDisk.hostPath }}
  hostPath:
    path: {{ $ctx.Values.kvDisk.hostPath }}
    type: DirectoryOrCreate
  {{- else }}
  ephemeral:
    volumeClaimTemplate:
      spec:
        accessModes: ["ReadWriteOnce"]
        {{- with $ctx.Values.kvDisk.storageClassName }}
        storageClassName: {{ . }}
        {{- end }}
        resources:
          requests:
            storage: {{ printf "%dGi" (int $ctx.Values.kvDisk.sizeGiB) }}
  {{- end }}
{{- end }}
{{- if include "ponder.configEnabled" $ctx }}
- name: config
  configMap:
    name: {{ include "ponder.fullname" $ctx }}-config
{{- end }}
{{- if include "ponder.apiKeysEnabled" $ctx }}
- name: api-keys
  secret:
    secretName: {{ include "ponder.apiKeysSecret" $ctx }}
    items:
      - key: keys.yaml
        path: keys.yaml
{{- end }}
{{- end }}

{{/* The model pull, when the model comes from Ponder's catalog rather than a folder on the volume. */}}
{{- define "ponder.initContainers" -}}
{{- if and .Values.model.pull (not .Values.app.engine.model_path) }}
- name: pull-model
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
  imagePullPolicy: {{ .Values.image.pullPolicy | default "IfNotPresent" }}
  command: ["ponder", "models", "pull", {{ .Values.app.engine.model | quote }}]
  env:
    - name: PONDER_HOME
      value: /var/lib/ponder
  volumeMounts:
    - name: models
      mountPath: /var/lib/ponder/models
{{- end }}
{{- end }}

{{/* The Ray container of a pod; `g` is the head or a worker group (cpus, memoryGiB, shmGiB, gpus). */}}
{{- define "ponder.resourceList" -}}
{{- $ctx := index . 0 }}{{- $g := index . 1 -}}
cpu: {{ add (int $g.cpus) (int (include "ponder.shardCpus" $ctx)) | quote }}
memory: {{ include "ponder.memoryMi" (list $ctx $g) }}
{{- if gt (int ($g.gpus | default 0)) 0 }}
nvidia.com/gpu: {{ int $g.gpus | quote }}
{{- end }}
{{- if $ctx.Values.network.rdma.enabled }}
{{ $ctx.Values.network.rdma.resourceName }}: {{ int $ctx.Values.network.rdma.count | quote }}
{{- end }}
{{- end }}

{{/* Requests equal limits: Guaranteed QoS, so a busy neighbour cannot starve an engine. */}}
{{- define "ponder.resources" -}}
requests:
  {{- include "ponder.resourceList" . | nindent 2 }}
limits:
  {{- include "ponder.resourceList" . | nindent 2 }}
{{- end }}

{{- define "ponder.podSpecCommon" -}}
{{- $ctx := index . 0 }}{{- $g := index . 1 -}}
{{- with $ctx.Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- if $ctx.Values.network.hostNetwork }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- with $g.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (include "ponder.initContainers" $ctx) }}
initContainers:
  {{- . | trim | nindent 2 }}
{{- end }}
{{- end }}

{{- define "ponder.securityContext" -}}
{{- if .Values.network.rdma.enabled }}
securityContext:
  capabilities:
    add: ["IPC_LOCK"]   # RDMA registers (pins) memory
{{- end }}
{{- end }}

{{/* Changing the tier table, the chat template or the keys rolls a new Ray cluster (KubeRay's zero-downtime upgrade). */}}
{{- define "ponder.podAnnotations" -}}
{{- if .Values.tiers }}
ponder.io/tiers-checksum: {{ toYaml .Values.tiers | sha256sum | trunc 16 }}
{{- end }}
{{- if .Values.chatTemplate }}
ponder.io/chat-template-checksum: {{ .Values.chatTemplate | sha256sum | trunc 16 }}
{{- end }}
{{- if .Values.apiKeys.keys }}
ponder.io/api-keys-checksum: {{ toYaml .Values.apiKeys.keys | sha256sum | trunc 16 }}
{{- end }}
{{- end }}
