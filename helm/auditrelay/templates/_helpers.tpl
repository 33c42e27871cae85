{{/* Names and labels. */}}
{{- define "auditrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "auditrelay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "auditrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "auditrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "auditrelay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "auditrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "auditrelay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "auditrelay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference: repository, then @digest when set, else :tag. Call with (list image defaultTag). */}}
{{- define "auditrelay.image" -}}
{{- $image := index . 0 }}
{{- $tag := default (index . 1) $image.tag }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository $tag }}
{{- end }}
{{- end }}

{{/* Fixed paths shared by the templates. */}}
{{- define "auditrelay.socketDir" -}}/run/auditrelay{{- end }}
{{- define "auditrelay.socketAddress" -}}unix://{{ include "auditrelay.socketDir" . }}/relay.sock{{- end }}
{{- define "auditrelay.spoolDir" -}}/var/lib/auditrelay{{- end }}
{{- define "auditrelay.imagePluginPath" -}}/opt/auditrelay/out_auditrelay.so{{- end }}
{{- define "auditrelay.policyDir" -}}/etc/auditrelay/policy{{- end }}
{{- define "auditrelay.clientCertificateDir" -}}/etc/auditrelay/client-certificate{{- end }}
{{- define "auditrelay.projectedTokenPath" -}}/var/run/secrets/auditrelay/azure-token/token{{- end }}
{{- define "auditrelay.clientSecretEnv" -}}AUDITRELAY_AZURE_CLIENT_SECRET{{- end }}

{{/* The active audit log: auditLog.path, else the distribution's default (docs/helm.md lists them). */}}
{{- define "auditrelay.auditLogPath" -}}
{{- $presets := dict
  "kubeadm" "/var/log/kubernetes/audit/audit.log"
  "openshift" "/var/log/kube-apiserver/audit.log"
  "rke2" "/var/lib/rancher/rke2/server/logs/audit.log"
  "k3s" "/var/lib/rancher/k3s/server/logs/audit.log"
  "aksEngine" "/var/log/kubeaudit/audit.log" }}
{{- default (get $presets .Values.auditLog.distro) .Values.auditLog.path }}
{{- end }}

{{/* The auth property's value for azure.auth.method. */}}
{{- define "auditrelay.authProperty" -}}
{{- $methods := dict
  "workloadIdentity" "workload_identity"
  "managedIdentity" "managed_identity"
  "clientSecret" "client_secret"
  "clientCertificate" "client_certificate"
  "default" "default" }}
{{- get $methods .Values.azure.auth.method }}
{{- end }}

{{/*
The azure.* values as properties of the auditrelay [OUTPUT] section, one "name value" line each.
A custom config.outputs includes it too: {{ include "auditrelay.outputProperties" . | nindent 4 }}.
*/}}
{{- define "auditrelay.outputProperties" -}}
{{- $azure := .Values.azure }}
{{- $auth := $azure.auth }}
{{- $properties := list (list "sidecar_address" (include "auditrelay.socketAddress" .)) }}
{{- if not $azure.useLocalEmulator }}
{{- if not $azure.endpoint }}
{{- fail "azure.endpoint is required: the logs ingestion endpoint of your data collection rule (docs/azure.md), or set azure.useLocalEmulator=true for a trial without Azure" }}
{{- end }}
{{- if not $azure.dcrId }}
{{- fail "azure.dcrId is required with azure.endpoint: the immutable id of the data collection rule (dcr-...)" }}
{{- end }}
{{- $properties = append $properties (list "endpoint" $azure.endpoint) }}
{{- $properties = append $properties (list "dcr_id" $azure.dcrId) }}
{{- $properties = append $properties (list "cloud" $azure.cloud) }}
{{- $properties = append $properties (list "auth" (include "auditrelay.authProperty" .)) }}
{{- with $auth.tenantId }}{{ $properties = append $properties (list "tenant_id" .) }}{{ end }}
{{- with $auth.clientId }}{{ $properties = append $properties (list "client_id" .) }}{{ end }}
{{- if eq $auth.method "workloadIdentity" }}
{{- if and (not $auth.clientId) $.Values.serviceAccount.create (not (hasKey $.Values.serviceAccount.annotations "azure.workload.identity/client-id")) }}
{{- fail "azure.auth.clientId is required with azure.auth.method=workloadIdentity: the client id of the identity whose federated credential trusts this service account (docs/azure.md)" }}
{{- end }}
{{- if $auth.workloadIdentity.projectedToken }}
{{- $properties = append $properties (list "federated_token_file" (include "auditrelay.projectedTokenPath" .)) }}
{{- end }}
{{- end }}
{{- if eq $auth.method "clientSecret" }}
{{- if not $auth.clientSecret.existingSecret }}
{{- fail "azure.auth.clientSecret.existingSecret is required with azure.auth.method=clientSecret: the name of a Secret holding the client secret (the chart never takes the secret itself)" }}
{{- end }}
{{- if not (and $auth.tenantId $auth.clientId) }}
{{- fail "azure.auth.tenantId and azure.auth.clientId are required with azure.auth.method=clientSecret" }}
{{- end }}
{{- $properties = append $properties (list "client_secret" (printf "${%s}" (include "auditrelay.clientSecretEnv" .))) }}
{{- end }}
{{- if eq $auth.method "clientCertificate" }}
{{- if not $auth.clientCertificate.existingSecret }}
{{- fail "azure.auth.clientCertificate.existingSecret is required with azure.auth.method=clientCertificate: the name of a Secret holding the PEM file" }}
{{- end }}
{{- if not (and $auth.tenantId $auth.clientId) }}
{{- fail "azure.auth.tenantId and azure.auth.clientId are required with azure.auth.method=clientCertificate" }}
{{- end }}
{{- $properties = append $properties (list "client_certificate" (printf "%s/%s" (include "auditrelay.clientCertificateDir" .) $auth.clientCertificate.key)) }}
{{- end }}
{{- end }}
{{- $properties = append $properties (list "stream" $azure.stream) }}
{{- with $azure.clusterName }}{{ $properties = append $properties (list "cluster_name" .) }}{{ end }}
{{- with $azure.clusterId }}{{ $properties = append $properties (list "cluster_id" .) }}{{ end }}
{{- with $azure.policy.existingConfigMap }}
{{- $properties = append $properties (list "policy" (printf "%s/%s" (include "auditrelay.policyDir" $) $azure.policy.key)) }}
{{- end }}
{{- range $name, $value := $azure.extraProperties }}
{{- $properties = append $properties (list $name (toString $value)) }}
{{- end }}
{{- $lines := list }}
{{- range $properties }}
{{- $lines = append $lines (printf "%-24s %s" (index . 0) (index . 1)) }}
{{- end }}
{{- join "\n" $lines }}
{{- end }}

{{/* fluent-bit.conf: the config.* sections through tpl. */}}
{{- define "auditrelay.fluentBitConf" -}}
{{- $sections := list }}
{{- range list .Values.config.service .Values.config.inputs .Values.config.filters .Values.config.outputs }}
{{- $section := tpl . $ | trim }}
{{- if $section }}{{ $sections = append $sections $section }}{{ end }}
{{- end }}
{{- join "\n\n" $sections }}
{{- end }}

{{/* Refuses hotReload.enabled with a worker pool on an auditrelay output: Fluent Bit starts a Go
plugin's pool twice, and after a reload the orphaned pool's timer reads the freed instance. Before
Fluent Bit 5.0 it also refuses it with Health_Check on ("auditrelay.reloadWithoutHealthCheck"). */}}
{{- define "auditrelay.checkHotReload" -}}
{{- if .Values.hotReload.enabled }}
{{- range regexFindAll "(?is)\\[OUTPUT\\][^\\[]*" (include "auditrelay.fluentBitConf" .) -1 }}
{{- if and (regexMatch "(?im)^\\s*name\\s+auditrelay\\s*$" .) (regexMatch "(?im)^\\s*workers\\s+0*[1-9]" .) }}
{{- fail "hotReload.enabled needs Workers 0 on every auditrelay output (set workers: 0): Fluent Bit (seen on v4.2.8 and v5.1.1) starts a Go plugin's worker pool twice and crashes (SIGSEGV) on the second or third reload. Or keep hotReload.enabled=false: a changed configuration then rolls the pods. See docs/plugin.md" }}
{{- end }}
{{- end }}
{{- if and (include "auditrelay.reloadWithoutHealthCheck" .) (regexMatch "(?im)^\\s*health_check\\s+(on|true|yes)\\s*$" (include "auditrelay.fluentBitConf" .)) }}
{{- fail (printf "hotReload.enabled with image.tag %v needs Health_Check Off in config.service: Fluent Bit before 5.0 frees its health-check counter while its HTTP server thread may still write to it, and a reload then corrupts the heap (SIGSEGV in mk_vhost_destroy, seen on v4.2.8). Set Health_Check Off (the default config.service renders it so), an image of Fluent Bit 5.0 or newer, or hotReload.enabled=false. See docs/plugin.md" .Values.image.tag) }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when Fluent Bit's health check must stay off: hot reload on an image before 5.0. Fluent
Bit 4.x frees its health counter before it stops its HTTP server's thread, which may still write
to it; a reload then corrupts the heap (SIGSEGV in mk_vhost_destroy, seen on 4.2.8). A tag that
is not a version counts as before 5.0. */}}
{{- define "auditrelay.reloadWithoutHealthCheck" -}}
{{- $tag := toString .Values.image.tag }}
{{- $v5 := and (regexMatch "^v?[0-9]+\\.[0-9]+\\.[0-9]+" $tag) (semverCompare ">=5.0.0-0" (regexFind "^v?[0-9]+\\.[0-9]+\\.[0-9]+" $tag)) }}
{{- if and .Values.hotReload.enabled (not $v5) }}true{{ end }}
{{- end }}

{{/* Health_Check of [SERVICE]: On, but Off when a hot reload would crash with it. */}}
{{- define "auditrelay.healthCheck" -}}
{{- if include "auditrelay.reloadWithoutHealthCheck" . }}Off{{ else }}On{{ end }}
{{- end }}

{{/* The readiness probe: /api/v1/health exists only with Health_Check On, so without it the probe
asks /api/v1/uptime (Fluent Bit answers, its engine runs). */}}
{{- define "auditrelay.readinessProbe" -}}
{{- $probe := deepCopy .Values.readinessProbe }}
{{- if and (include "auditrelay.reloadWithoutHealthCheck" .) $probe.httpGet }}
{{- if eq (toString $probe.httpGet.path) "/api/v1/health" }}
{{- $_ := set $probe.httpGet "path" "/api/v1/uptime" }}
{{- end }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/* The data of the configuration ConfigMap: fluent-bit.conf, custom_parsers.conf, config.extraFiles. */}}
{{- define "auditrelay.fluentBitConfigData" -}}
{{- include "auditrelay.checkHotReload" . }}
fluent-bit.conf: |
  {{- include "auditrelay.fluentBitConf" . | nindent 2 }}
custom_parsers.conf: |
  {{- tpl .Values.config.customParsers . | nindent 2 }}
{{- range $name, $content := .Values.config.extraFiles }}
{{ $name }}: |
  {{- tpl $content $ | nindent 2 }}
{{- end }}
{{- end }}

{{/* "true" when the sidecar runs as a native sidecar: wanted, and the cluster has them (1.29+). */}}
{{- define "auditrelay.nativeSidecar" -}}
{{- if and .Values.sidecar.nativeSidecar (semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version) }}true{{ end }}
{{- end }}
