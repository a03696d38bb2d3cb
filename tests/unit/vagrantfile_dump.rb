# Load a Vagrantfile with Vagrant's own loader (as `vagrant up` does) and print, as JSON, what each
# named provider's machine gets: box, forwarded ports, provisioners, triggers, provider settings,
# validation errors, the post-up message, and the Vagrantfile's pre-up check for a few providers.
#
#   ruby vagrantfile_dump.rb PROJECT_DIR virtualbox libvirt
require "rubygems"
require "json"

vagrant_spec = Gem::Specification.find_all_by_name("vagrant").max_by(&:version)
activate = proc do |spec|
  spec.runtime_dependencies.each do |dep|
    gem(dep.name, *dep.requirement.as_list)
    found = Gem::Specification.find_all_by_name(dep.name).detect(&:activated?)
    activate.call(found) if found
  end
end
activate.call(vagrant_spec)
$VERBOSE = nil
require "vagrant"

PLAIN = [String, Symbol, Array, Hash, Integer, TrueClass, FalseClass, NilClass].freeze

def plain(config)
  config.instance_variables.to_h { |v| [v.to_s.delete("@"), config.instance_variable_get(v)] }
        .select { |name, value| !name.start_with?("_") && PLAIN.any? { |c| value.is_a?(c) } }
end

def triggers(config, kind)
  config.trigger.instance_variable_get(kind).map { |t| {name: t.name, command: t.command.to_s} }
end

env = Vagrant::Environment.new(cwd: ARGV[0], ui_class: Vagrant::UI::Silent)
out = {vagrant: Vagrant::VERSION, machines: {}, problems: {}}
ARGV[1..].each do |provider|
  machine = env.machine(:default, provider.to_sym)
  vm = machine.config.vm
  provider_config = machine.provider_config
  out[:machines][provider] = {
    box: vm.box,
    forwarded_ports: vm.networks.select { |type, _| type == :forwarded_port }.map { |_, o| o },
    provisioners: vm.provisioners.map { |p| {name: p.name.to_s, type: p.type.to_s, config: plain(p.config)} },
    synced_folders: vm.synced_folders.transform_values { |o| {disabled: o[:disabled]} },
    provider: provider == "virtualbox" ? {customizations: provider_config.customizations} :
                                         {memory: provider_config.memory, cpus: provider_config.cpus},
    before: triggers(machine.config, :@_before_triggers),
    after: triggers(machine.config, :@_after_triggers),
    errors: machine.config.validate(machine),
    post_up_message: vm.post_up_message,
  }
end
[:virtualbox, :libvirt, :docker].each do |provider|
  out[:problems][provider] = send(:devpi_agent_problem, provider)
end
puts JSON.generate(out)
