-- lsyncd 2.2.3, default.rsync, delay = 0 (minimum), rsync over ssh to the
-- harness's sshd (--target ssh): target "USER@127.0.0.1:DST/", ssh given as rsh.
-- Rendered by syncbench (--config-template); {placeholders} are filled in.
settings {
    nodaemon   = true,
    logfile    = "{workdir}/lsyncd.log",
    statusFile = "{workdir}/lsyncd.status",
}
sync {
    default.rsync,
    source = "{src}",
    target = "{url}",
    delay  = 0,
    rsync  = {
        binary = "{rsync}",  -- syncbench's logging shim
        rsh    = "ssh -p {ssh_port} -i {ssh_key} -o UserKnownHostsFile={ssh_known_hosts} -o StrictHostKeyChecking=yes -o BatchMode=yes -o IdentitiesOnly=yes",
    },
}
